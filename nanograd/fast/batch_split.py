"""The walk through the blocks with the batch cut over the CPU threads: one share of sequences per core.

    nanograd.block.blocks_forward / blocks_backward
        -> blocks_forward / blocks_backward: each thread walks its share of the batch
           through every block (nanograd.block.blocks_forward itself, with the
           kernels of cpu_kernels.py kept to its one core); the weights' gradients
           are the sum of the shares'

Every operation of a block but the weights' gradients is per sequence, so the
shares need nothing from each other until the end of the backward.  Handing
work to another thread costs ~100 us on a VM (waking it), and the per-kernel
cut of cpu_kernels.py pays it ~50 times a step; this cut pays it twice.  It
needs a sequence per thread: with fewer sequences than threads the walk is
the plain one with the given (per-kernel threaded) kernels.

The dropout masks are those of the unsplit walk, bit for bit: a share's i-th
draw is its rows of the whole batch's i-th draw (BatchDraws).  The rest equals
the unsplit walk to rounding (the weights' gradients are summed in another
order): tests/test_fast_batch_split.py.
"""
import functools
import threading
from typing import NamedTuple

import numpy as np

from ..block import BlockParams
from ..block import blocks_backward as plain_blocks_backward
from ..block import blocks_forward as plain_blocks_forward
from .cpu_kernels import parallel
from .threads import cpu_threads, split_range


class SplitBlocksCache(NamedTuple):
    shares: list  # (start, stop) of each share's sequences
    caches: list  # per share, the plain walk's list of a BlockCache per block


def batch_shares(B):
    """(start, stop) of each thread's sequences; one share (no cut) when B < the threads."""
    threads = cpu_threads()
    return split_range(B, threads) if B >= threads else [(0, B)]


@functools.cache
def one_core_kernels():
    """The fast kernel table with every kernel kept to the thread that calls it."""
    from .kernels import kernel_table
    return kernel_table(np, threads=1)


def blocks_forward(x, blocks, dropout_p=0.0, rng=None, train=True, kernels=None):
    """nanograd.block.blocks_forward, each share of the batch on a thread of its own.
    kernels: the table for an uncut walk.  Cache: SplitBlocksCache, or the plain list."""
    shares = batch_shares(len(x))
    if len(shares) < 2:
        return plain_blocks_forward(x, blocks, dropout_p, rng, train, kernels)
    draws = BatchDraws(rng, len(x))
    results = parallel([(plain_blocks_forward, x[s:e], blocks, dropout_p, draws.share(s, e), train,
                         one_core_kernels()) for s, e in shares])
    out = np.concatenate([share_out for share_out, _ in results])  # (B, T, C)
    return out, SplitBlocksCache(shares, [caches for _, caches in results])


def blocks_backward(dout, cache):
    """nanograd.block.blocks_backward, each share on a thread of its own; the weights' gradients summed."""
    if not isinstance(cache, SplitBlocksCache):
        return plain_blocks_backward(dout, cache)
    results = parallel([(plain_blocks_backward, dout[s:e], caches) for (s, e), caches in zip(*cache)])
    dx = np.concatenate([share_dx for share_dx, _ in results])  # (B, T, C)
    dblocks = results[0][1]  # the first share's arrays, fresh from its kernels, take the others' sums
    for _, share_dblocks in results[1:]:
        for total, part in zip(dblocks, share_dblocks):
            for total_grad, grad in zip(total, part):
                total_grad += grad
    return dx, [BlockParams(*grads) for grads in dblocks]


class BatchDraws:
    """A generator for the shares of one batch: a share's i-th draw is its rows of the whole
    batch's i-th draw, which the first share to ask for it makes from rng.  Every draw of a
    block (nanograd.dropout, cpu_kernels.attention_forward) has the batch as its first axis."""

    def __init__(self, rng, batch):
        self.rng, self.batch = rng, batch
        self.draws = []
        self.lock = threading.Lock()

    def whole(self, i, shape, dtype):
        with self.lock:
            if i == len(self.draws):
                self.draws.append(self.rng.random((self.batch,) + tuple(shape[1:]), dtype=dtype))  # (B, ...)
            return self.draws[i]

    def share(self, start, stop):
        return ShareDraws(self, start, stop)


class ShareDraws:
    """The generator one share's walk draws from: rows start:stop of each whole draw."""

    def __init__(self, draws, start, stop):
        self.draws, self.start, self.stop = draws, start, stop
        self.count = 0

    def random(self, shape, dtype=np.float64):
        whole = self.draws.whole(self.count, shape, dtype)  # (B, ...)
        self.count += 1
        return whole[self.start:self.stop]  # (stop - start, ...)
