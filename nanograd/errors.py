"""UserError: what the person running us gave that cannot work (a path, a flag, a file), not a bug.

Commands catch it, print it to stderr and exit with status 2, so its message
must be one sentence naming the problem and what to do.  Defined here, at the
bottom, so that nanograd.fast (MPI start-up checks) and python -m
nanograd.gradcheck can use them too; transformer.errors builds on them.
"""
import argparse


class UserError(Exception):
    """Bad user input; str() is one sentence saying what is wrong and what to do."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help ends each option's line with "(default: X)", unless its help already says
    "default" (a default of None means "not given": the help words what happens then)
    or the option is an on/off switch, off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # (0 == False)
        if "default" in text or off or not action.option_strings:
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
