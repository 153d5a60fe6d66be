"""The one exception type that reaches users.

Library code raises :class:`HarnessError` with a single line that names the bad value and what is
allowed; the CLI prints it as ``error: ...`` and exits with status 2. Anything else escaping to the
CLI is a bug.
"""


class HarnessError(Exception):
    """A user-facing error: one line, the bad value, what is allowed."""

    exit_code = 2
