"""Evaluation losses: the mean over a stream of batches, and the exact loss over a whole split.

Both run with dropout off (the caller's model.eval()).  Batches are drawn one
at a time, so memory does not grow with their number, and check_signals() is
asked after each forward, so a signal stops a long evaluation at once.  Under
MPI (comm) the forwards are shared among the ranks and their losses added in
the same order as one process adds them, so the result is the same bits.
"""
import numpy as np


def mean_loss(model, batches, n, check_signals=lambda: None, comm=None):
    """The mean of model(inputs, targets)'s loss over the n batches of the iterator batches.

    Under MPI every rank draws every batch (cheap: they are indices) and batch i is run
    by rank i % size; after each round of size batches the ranks exchange their losses,
    and each adds them in batch order."""
    total = 0.0
    if comm is None:
        for batch in batches:
            total += model(*batch)[1]
            check_signals()
        return total / n
    for first in range(0, n, comm.size):
        count = min(comm.size, n - first)  # batches in this round
        mine = np.zeros(comm.size)  # (size,) this rank's loss in its slot, 0 elsewhere
        for i in range(count):
            batch = next(batches)
            if i == comm.rank:
                mine[i] = model(*batch)[1]
        for value in comm.allreduce_host(mine)[:count]:  # adding zeros is exact: each slot is one rank's
            total += value
        check_signals()
    return total / n


def full_loss(model, data, context_length, batch_size, comm=None, check_signals=lambda: None):
    """Mean loss over every token of data in order: consecutive windows of context_length,
    batch_size of them per forward, then the shorter rest.  Under MPI the forwards are
    shared among the ranks and their sums added in the same order as one process."""
    n = len(data) - 1  # positions that have a next token
    T, windows = context_length, n // context_length
    firsts = range(0, windows, batch_size)
    rest = n - windows * T
    sums = np.zeros(len(firsts) + 1)  # (forwards + 1,) each forward's summed loss, then the rest's
    for i in comm.share(len(sums)) if comm else range(len(sums)):
        if i < len(firsts):
            starts = np.arange(firsts[i], min(firsts[i] + batch_size, windows))[:, None] * T  # (B, 1)
            index = starts + np.arange(T)  # (B, T)
            sums[i] = model(data[index], data[index + 1])[1] * index.size
        elif rest:
            sums[i] = model(data[windows * T:n][None], data[windows * T + 1:][None])[1] * rest
        if comm is None:
            check_signals()
    if comm:
        sums = comm.allreduce_host(sums)
    total = 0.0
    for value in sums:
        total += value
    return float(total / n)


def logged_before(outputs, step, comm=None):
    """True when the metrics file already holds the evaluation at step (RunOutputs.logged): the
    run a resumed one continues made it after saving at step, so it is not made, or logged, twice.
    Under MPI rank 0 reads the file and every rank learns its answer: they evaluate together."""
    logged = outputs.logged(step)
    if comm:
        logged = bool(comm.allreduce_host([logged])[0])
    return logged
