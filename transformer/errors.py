"""Errors caused by what the user gave us (a path, a flag, a file), not by a bug.

Top-level scripts catch `UserError`, print it to stderr and exit with status 2,
so its message must be one sentence that names the problem and what to do.
"""


class UserError(Exception):
    """Bad user input; str() is one sentence saying what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint file is missing, foreign, corrupted or of an unsupported version."""
