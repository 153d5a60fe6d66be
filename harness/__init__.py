"""bptt-harness: measure how bptt and batch size trade perplexity against time, memory and energy.

Importing the package changes nothing process-wide (threads, OpenMP, allocator): the ``harness``
command sets what it needs in :func:`harness.cli.configure_process`.
"""

__version__ = "0.1.0"
