"""What bptt does to a model, measured: context use, gradient reach, truncation bias, gradient noise scale.

Each measurement is a function of a model, its family and a split (1-D token ids) that returns a typed
result; :func:`diagnose` takes the four with a study's :class:`DiagnoseOptions`. They leave the model's
mode, its gradients and the process's RNG states as they found them.
"""

from bptt_harness.diagnose.bias import TruncationBias, truncated_gradient, truncation_bias
from bptt_harness.diagnose.context import ContextUse, context_ladder, context_use
from bptt_harness.diagnose.noise import NoiseScale, noise_estimates, noise_scale
from bptt_harness.diagnose.observer import DiagnosticsObserver, save_model
from bptt_harness.diagnose.reach import GradientReach, gradient_reach, input_embedding
from bptt_harness.diagnose.run import COLUMNS, Diagnosis, bias_ladder, diagnose, text_period
from bptt_harness.diagnose_options import DiagnoseOptions

__all__ = ["ContextUse", "context_use", "context_ladder", "GradientReach", "gradient_reach", "input_embedding",
           "TruncationBias", "truncation_bias", "truncated_gradient", "NoiseScale", "noise_scale", "noise_estimates",
           "Diagnosis", "diagnose", "bias_ladder", "text_period", "COLUMNS", "DiagnoseOptions",
           "DiagnosticsObserver", "save_model"]
