"""Errors caused by what the user gave us (a path, a flag, a file), not by a bug.

Top-level scripts catch `UserError`, print it to stderr and exit with status 2,
so its message must be one sentence that names the problem and what to do.
"""
import argparse

from nanograd.command import run_command  # noqa: F401  every command's start and end, gradcheck's too

from nanograd.errors import UserError  # noqa: F401  (defined at the bottom layer; raised everywhere)


class CheckpointError(UserError):
    """A checkpoint file is missing, foreign, corrupted or of an unsupported version."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (and exit 2), not the usage block, and a
    flag must be spelled in full: `--lr 0.01` is an error, not --lr-schedule."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
