"""UserError: what the person running us gave that cannot work (a path, a flag, a file), not a bug.

Commands catch it, print it to stderr and exit with status 2, so its message
must be one sentence naming the problem and what to do.  Defined here, at the
bottom, so that nanograd.fast (MPI start-up checks) and python -m
nanograd.gradcheck can use them too; transformer.errors builds on them.
"""
import argparse


class UserError(Exception):
    """Bad user input; str() is one sentence saying what is wrong and what to do."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (and exit 2), not the usage block, and a
    flag must be spelled in full: `--lr 0.01` is an error, not --lr-schedule."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
