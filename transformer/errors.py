"""Errors caused by what the user gave us (a path, a flag, a file), not by a bug.

Top-level scripts catch `UserError`, print it to stderr and exit with status 2,
so its message must be one sentence that names the problem and what to do.
"""
from nanograd.command import run_command  # noqa: F401  every command's start and end, gradcheck's too
from nanograd.errors import OneLineParser, UserError  # noqa: F401  defined at the bottom layer, used everywhere


class CheckpointError(UserError):
    """A checkpoint file is missing, foreign, corrupted or of an unsupported version."""


