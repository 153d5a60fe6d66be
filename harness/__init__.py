"""bptt-harness: measure how bptt and batch size trade perplexity against time, memory and energy."""

__version__ = "0.1.0"
