"""Errors caused by what the user gave us (a path, a flag, a file), not by a bug.

Top-level scripts catch `UserError`, print it to stderr and exit with status 2,
so its message must be one sentence that names the problem and what to do.
"""
import argparse
import os
import signal
import sys

from nanograd.errors import UserError  # noqa: F401  (defined at the bottom layer; raised everywhere)


class CheckpointError(UserError):
    """A checkpoint file is missing, foreign, corrupted or of an unsupported version."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help ends each option's line with "(default: X)", unless its help already says
    "default" (a default of None means "not given": the help words what happens then)
    or the option is an on/off switch, off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (and exit 2), not the usage block, and a
    flag must be spelled in full: `--lr 0.01` is an error, not --lr-schedule.  --help shows
    every option's default (DefaultsHelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_command(main):
    """sys.exit(main()), quietly when the reader of stdout goes away (`... | head`), and with one
    line, not a traceback, on Ctrl-C (exit 130, as a shell reports it)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # train.py, inference.py set it while importing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            code = main()
        finally:
            sys.stdout.flush()  # a closed pipe shows up here (also after --help), not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted (Ctrl-C).", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
