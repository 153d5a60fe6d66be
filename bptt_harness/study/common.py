"""What every part of a study shares: its limits and the exception that fails a trial."""

MAX_RETRIES = 2
CANONICAL = {"bptt": 35, "batch_size": 20}
# How long a remote worker may be silent before its RUNNING trial counts as dead (RDB storages).
HEARTBEAT_S, GRACE_S = 10, 60
RACE_POLL_S = 2.0


class TrialFailed(Exception):
    """Raised by the objective so Optuna records FAIL; the sweep goes on (``catch=``)."""
