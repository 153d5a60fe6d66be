"""bptt-harness: measure how bptt and batch size trade perplexity against time, memory and energy.

Importing the package changes nothing process-wide (threads, OpenMP policy, allocator settings): a
notebook that imports it runs exactly as it did before.
"""

__version__ = "0.1.0"
