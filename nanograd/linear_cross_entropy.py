"""The output layer and the loss in one: cross_entropy(x @ W.T + b, targets), a slice of the vocabulary at a time.

This is the same function as linear_forward followed by cross_entropy_forward
(that pair is the reference the tests hold it to), computed on every CPU core
and with no (N, V) temporaries.  The vocabulary is cut into chunks of vchunk
columns; each CPU thread takes a range of chunks and, for each one, makes its
logits with one matrix product and turns them into exponentials while they
are still in cache:

    logits_c = x @ W_c.T + b_c                      (N, vchunk)
    max_c    = rowmax(logits_c)                     (N,)
    exp_c    = exp(logits_c - max_c)                (N, vchunk)  kept in `work`
    sum_c    = rowsum(exp_c)                        (N,)

A row's softmax needs its maximum and its sum over the whole vocabulary, so
the chunks are joined afterwards, on (N, chunks) numbers only:

    M = max over c of max_c,  S = sum over c of sum_c * exp(max_c - M)
    logsumexp = M + log S,    probs_c = exp_c * exp(max_c - M) / S

The backward needs dlogits = (probs - onehot) * dloss / N in the output
layer's three gradients (see linear_backward).  Its two terms go in apart,
so dlogits is never written out: the dense one, probs_c = exp_c * r_c with
r_c = exp(max_c - M) / S one number per row, is exp_c with its rows scaled,
and a row scale can move onto the small factor of each product; the one-hot
one touches only the rows of W and b at the targets.  With s = r_c * dloss / N:

    dW_c = exp_c.T @ (s * x),   db_c = s @ exp_c,   dx += s * (exp_c @ W_c)
    then  dW[targets] -= x * dloss / N,   db[targets] -= dloss / N,   dx -= W[targets] * dloss / N

(scatter-added: a target id can repeat).  The backward only reads work.

On CuPy arrays (a GPU has no cache to keep a chunk in) it is the plain pair
of kernels.  BLAS must be single-threaded for the chunks' threads not to fight
it for the cores: train.py sets OPENBLAS_NUM_THREADS=1 before NumPy loads.
"""
from typing import NamedTuple

import numpy as np

from .backend import cpu_threads, get_array_module, parallel, scatter_add, split_range
from .cross_entropy import cross_entropy_backward, cross_entropy_forward
from .linear import linear_backward, linear_forward

VCHUNK = 4096  # vocabulary columns per chunk: the fastest of 2048-16384 on the book's config (4 MB at N = 256)


class LinearCrossEntropyCache(NamedTuple):
    x: object          # (..., C) as given
    W: object          # (V, C)
    work: object       # (N, V) exp(logits_c - max_c), chunk by chunk
    row_scale: object  # (N, chunks) exp(max_c - M) / S: turns exp_c into probs_c
    targets: object    # (N,) int
    vchunk: int        # columns per chunk


class ComposedCache(NamedTuple):  # CuPy: the caches of the plain pair
    linear: object
    loss: object


def balanced_width(V, vchunk):
    """A chunk width near vchunk that cuts V into a multiple of 4 chunks of one width
    (the last a little shorter): 2 or 4 CPU threads then get equal shares, and the
    chunks, so the numbers, are the same whatever the number of threads."""
    chunks = 4 * max(1, round(V / (4 * vchunk)))
    return -(-V // chunks)


def chunk_ranges(V, vchunk):
    """Per CPU thread, its chunks as (chunk number, start, stop): consecutive, vchunk columns wide."""
    return [[(s // vchunk, s, min(s + vchunk, stop)) for s in range(start, stop, vchunk)]
            for start, stop in split_range(V, cpu_threads(), vchunk)]


def _forward_chunks(x, W, b, targets, work, chunk_max, chunk_sum, target_logit, chunks):
    """One thread's share of the forward: logits, max, exp and sum of each of its chunks."""
    rows = np.arange(x.shape[0])  # (N,)
    ones = np.ones(chunks[0][2] - chunks[0][1], x.dtype)  # (vchunk,) a thread's first chunk is a full one
    for c, s, e in chunks:
        logits = work[:, s:e]  # (N, vchunk) a view: the product is written straight into work
        np.matmul(x, W[s:e].T, out=logits)
        logits += b[s:e]
        here = (targets >= s) & (targets < e)  # (N,) positions whose target id is in this chunk
        target_logit[here] = logits[rows[here], targets[here] - s]
        logits.max(axis=1, out=chunk_max[:, c])  # (N,)
        logits -= chunk_max[:, c, None]
        np.exp(logits, out=logits)  # (N, vchunk) now exp_c, every entry <= 1
        np.matmul(logits, ones[: e - s], out=chunk_sum[:, c])  # (N,) the row sums, as one BLAS call


def linear_cross_entropy_forward(x, W, b, targets, work, vchunk=None):
    """x (..., C), W (V, C), b (V,), targets (...) ints, work (N, V) -> loss (0-d), cache.

    loss = mean_n(logsumexp(logits[n]) - logits[n, targets[n]]) with
    logits = x @ W.T + b, as linear_forward then cross_entropy_forward.
    work is a preallocated (N, V) array, N = number of positions; it ends
    up holding the chunks' exponentials, which the backward reads (on CuPy,
    which runs the plain pair, it is not used and may be None).
    vchunk: about how many vocabulary columns a chunk has, VCHUNK by
    default, adjusted by balanced_width (any width gives the same loss, to
    rounding).
    """
    xp = get_array_module(x)
    x2, targets = x.reshape(-1, W.shape[1]), targets.reshape(-1)  # (N, C), (N,)
    if xp is not np:
        logits, linear = linear_forward(x, W, b)  # (..., V)
        loss, ce = cross_entropy_forward(logits.reshape(targets.size, -1), targets)
        return loss, ComposedCache(linear, ce)
    N, V = work.shape
    if N and not 0 <= int(targets.min()) <= int(targets.max()) < V:
        raise IndexError(f"target ids must lie in 0..{V - 1}, got {int(targets.min())}..{int(targets.max())}")
    vchunk = balanced_width(V, vchunk or VCHUNK)  # 24 chunks of 4176 for the book's V = 100,218
    chunks = -(-V // vchunk)
    chunk_max = np.empty((N, chunks), W.dtype)  # (N, chunks)
    chunk_sum = np.empty((N, chunks), W.dtype)  # (N, chunks)
    target_logit = np.empty(N, W.dtype)  # (N,)
    parallel([(_forward_chunks, x2, W, b, targets, work, chunk_max, chunk_sum, target_logit, ranges)
              for ranges in chunk_ranges(V, vchunk)])
    M = chunk_max.max(axis=1, keepdims=True)  # (N, 1) each position's largest logit
    rescale = np.exp(chunk_max - M)  # (N, chunks) exp(max_c - M) <= 1
    S = (chunk_sum * rescale).sum(axis=1, keepdims=True)  # (N, 1) sum of exp(logits - M) over the vocabulary
    loss = (M[:, 0] + np.log(S[:, 0]) - target_logit).mean()  # ()
    return loss, LinearCrossEntropyCache(x, W, work, rescale / S, targets, vchunk)


def _backward_chunks(dloss_over_N, cache, dW, db, dx, chunks):
    """One thread's share of the backward's dense term: rows of dW and db, and a partial dx, per chunk."""
    x, W, work, row_scale, _, _ = cache
    x = x.reshape(-1, W.shape[1])  # (N, C)
    dx.fill(0)
    for c, s, e in chunks:
        exp = work[:, s:e]  # (N, vchunk) exp_c from the forward
        scale = row_scale[:, c] * dloss_over_N  # (N,) probs_c * dloss / N = exp_c * scale per row
        np.matmul(exp.T, x * scale[:, None], out=dW[s:e])  # (vchunk, C)
        np.matmul(scale, exp, out=db[s:e])  # (vchunk,)
        dx += (exp @ W[s:e]) * scale[:, None]  # (N, C)


def linear_cross_entropy_backward(dloss, cache, dW_out=None):
    """Returns (dx (..., C), dW (V, C), db (V,)): the plain pair's gradients,

        dlogits = (softmax(logits) - onehot(targets)) * dloss / N
        dx = dlogits @ W,   dW = dlogits.T @ x,   db = dlogits summed over positions

    made chunk by chunk (see the module's docstring).  The cache is only
    read.  dW_out, if given, is a (V, C) array that receives dW.
    """
    if isinstance(cache, ComposedCache):
        dlogits = cross_entropy_backward(dloss, cache.loss)  # (N, V)
        return linear_backward(dlogits.reshape(cache.linear.x.shape[:-1] + (-1,)), cache.linear, dW_out=dW_out)
    x, W = cache.x, cache.W
    (V, C), N = W.shape, cache.work.shape[0]
    dW = np.empty((V, C), x.dtype) if dW_out is None else dW_out  # (V, C)
    db = np.empty(V, x.dtype)  # (V,)
    shares = chunk_ranges(V, cache.vchunk)
    dx_parts = np.empty((len(shares), N, C), x.dtype)  # (threads, N, C) one partial sum per thread
    dloss_over_N = float(dloss) / N
    parallel([(_backward_chunks, dloss_over_N, cache, dW, db, dx_part, ranges)
              for dx_part, ranges in zip(dx_parts, shares)])
    dx = dx_parts.sum(axis=0)  # (N, C)
    targets, x2 = cache.targets, x.reshape(N, C)  # (N,), (N, C)
    scatter_add(dW, targets, x2 * -dloss_over_N)  # minus the one-hot term: only the target rows
    scatter_add(db, targets, np.full(N, -dloss_over_N, x.dtype))
    dx -= W[targets] * dloss_over_N
    return dx.reshape(x.shape), dW, db  # (..., C), (V, C), (V,)
