"""User-facing error types.

Every error a user can cause (bad file, bad config, bad flag value) is a :class:`NailfoldError`;
the CLI prints its message as one line (``nailfold: error: …``) and exits with status 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class NailfoldError(Exception):
    """Base class of errors caused by the user's input, with a one-line message."""


class InputError(NailfoldError, ValueError):
    """An input file or stream cannot be used (missing, corrupt, not a video, wrong size…)."""
