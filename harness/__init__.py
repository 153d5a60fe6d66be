"""bptt-harness: measure how bptt and batch size trade perplexity against time, memory and energy."""

import os

__version__ = "0.1.0"

# OpenMP worker threads that spin between parallel regions starve every other thread of the
# process: with torch's default policy, the probe's 50 ms sampler (which needs the GIL) slowed CPU
# training 4x on a 2-core machine. Passive waiting costs nothing measurable and removes that. It
# must be set before torch starts its OpenMP runtime, hence here; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
