"""Errors caused by what the user gave us (a path, a flag, a file), not by a bug.

Top-level scripts catch `UserError`, print it to stderr and exit with status 2,
so its message must be one sentence that names the problem and what to do.
"""
import os
import signal
import sys

from nanograd.errors import OneLineParser, UserError  # noqa: F401  (defined at the bottom layer; used everywhere)


class CheckpointError(UserError):
    """A checkpoint file is missing, foreign, corrupted or of an unsupported version."""


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
