"""UserError: what the person running us gave that cannot work (a path, a flag, a file), not a bug.

Commands catch it, print it to stderr and exit with status 2, so its message
must be one sentence naming the problem and what to do.  Defined here, at the
bottom, so that nanograd.fast (MPI start-up checks) can raise it too;
transformer.errors builds on it.
"""


class UserError(Exception):
    """Bad user input; str() is one sentence saying what is wrong and what to do."""
