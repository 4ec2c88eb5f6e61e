"""Errors caused by what the user gave us (a path, a flag, a file), not by a bug.

Top-level scripts catch `UserError`, print it to stderr and exit with status 2,
so its message must be one sentence that names the problem and what to do.
"""
import argparse



class UserError(Exception):
    """Bad user input; str() is one sentence saying what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint file is missing, foreign, corrupted or of an unsupported version."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (and exit 2), not the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
