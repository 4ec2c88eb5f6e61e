"""The output layer and the loss in one: cross_entropy(x @ W.T + b, targets), a slice of the vocabulary at a time.

Replaces nanograd.linear_forward followed by nanograd.cross_entropy_forward,
and their backwards, in the model's last step (FastModel); that plain pair is
the reference tests/test_fast_linear_cross_entropy.py holds it to.  The same
function, computed on every CPU core
and with no (N, V) temporaries.  The vocabulary is cut into chunks of vchunk
columns; each CPU thread takes a range of chunks and, for each one, makes its
shifted logits with one matrix product and turns them into exponentials while
they are still in cache:

    e_c   = exp(x @ W_c.T + b_c - shift)            (N, vchunk)  kept in `work`
    sum_c = rowsum(e_c)                             (N,)

Softmax is unchanged by subtracting one number per row; the shift is there only
to keep exp inside float32's range.  The textbook shift is the row's maximum,
which costs two more passes over the logits (find it, subtract it).  Here it is
the target's own logit, shift = x . W[target] + b[target], one dot product per
row, known before the product, so it rides into the product as an extra column:

    [x, 1, -shift] @ [W_c, b_c, 1].T = x @ W_c.T + b_c - shift

With this shift each row's sum S = sum over c of sum_c includes exp(0) = 1 (the
target's term), so it cannot underflow; it overflows only if a logit beats the
target's by ~88, a loss above 88 that only a run blowing up reaches.  Then the
forward is done again with the row maxima as the shift.  Either way

    loss = mean_n(log S + shift - target_logit),    probs_c = e_c / S

The backward needs dlogits = (probs - onehot) * dloss / N in the output
layer's three gradients (see linear_backward).  Its two terms go in apart,
so dlogits is never written out: the dense one, probs_c = e_c * r with
r = 1 / S one number per row, is e_c with its rows scaled, and a row scale
can move onto the small factor of each product; the one-hot one touches only
the rows of W and b at the targets.  With s = r * dloss / N:

    dW_c = e_c.T @ (s * x),   db_c = s @ e_c,   dx = s * (sum over c of e_c @ W_c)
    then  dW[targets] -= x * dloss / N,   db[targets] -= dloss / N,   dx -= W[targets] * dloss / N

(scatter-added: a target id can repeat).  The backward only reads work.

On CuPy arrays (a GPU has no cache to keep a chunk in) it is the plain linear
layer and the fused CUDA cross-entropy kernel (cuda_kernels.py).  BLAS must be single-threaded for the chunks' threads not to fight
it for the cores: the fast path sets BLAS to one thread (threads.use_own_threads).
"""
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module, scatter_add
from .cpu_kernels import scatter_add_rows
from ..linear import linear_backward, linear_forward
from . import cuda_kernels
from .threads import cpu_threads, parallel, split_range

VCHUNK = 4096  # vocabulary columns per chunk: the fastest of 2048-16384 on the book's config (4 MB at N = 256)


class LinearCrossEntropyCache(NamedTuple):
    x: object          # (..., C) as given
    W: object          # (V, C)
    work: object       # (N, V) exp(logits - shift), chunk by chunk
    row_scale: object  # (N,) 1 / S: turns work's rows into probabilities
    targets: object    # (N,) int
    vchunk: int        # columns per chunk


class ComposedCache(NamedTuple):  # CuPy: the caches of the linear layer and the CUDA cross-entropy
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


def _forward_chunks(x_shift, W, b, work, chunk_sum, chunks):
    """One thread's share of the forward: exp(logits - shift) of each of its chunks, and their row sums.

    x_shift is [x, 1, -shift] (N, C+2); each chunk's [W_c, b_c, 1] is copied into a scratch
    array, so one product gives logits - shift.
    """
    C, width = W.shape[1], chunks[0][2] - chunks[0][1]  # a thread's first chunk is its widest
    W_chunk = np.empty((width, C + 2), W.dtype)  # (vchunk, C+2) [W_c, b_c, 1]
    W_chunk[:, C + 1] = 1
    ones = np.ones(width, W.dtype)  # (vchunk,)
    for c, s, e in chunks:
        W_chunk[: e - s, :C] = W[s:e]
        W_chunk[: e - s, C] = b[s:e]
        shifted = work[:, s:e]  # (N, vchunk) a view: the product is written straight into work
        np.matmul(x_shift, W_chunk[: e - s].T, out=shifted)  # logits_c - shift
        np.exp(shifted, out=shifted)  # (N, vchunk) now e_c
        np.matmul(shifted, ones[: e - s], out=chunk_sum[:, c])  # (N,) the row sums, as one BLAS call


def linear_cross_entropy_forward(x, W, b, targets, work, vchunk=None):
    """x (..., C), W (V, C), b (V,), targets (...) ints, work (N, V) -> loss (0-d), cache.

    loss = mean_n(logsumexp(logits[n]) - logits[n, targets[n]]) with
    logits = x @ W.T + b, as linear_forward then cross_entropy_forward.
    work is a preallocated (N, V) array, N = number of positions; it ends
    up holding exp(logits - shift), which the backward reads (on CuPy it
    is not used and may be None).
    vchunk: about how many vocabulary columns a chunk has, VCHUNK by
    default, adjusted by balanced_width (any width gives the same loss, to
    rounding).
    """
    xp = get_array_module(x)
    x2, targets = x.reshape(-1, W.shape[1]), targets.reshape(-1)  # (N, C), (N,)
    if xp is not np:
        logits, linear = linear_forward(x, W, b)  # (..., V)
        loss, ce = cuda_kernels.cross_entropy_forward(logits.reshape(targets.size, -1), targets)
        return loss, ComposedCache(linear, ce)
    N, V = work.shape
    if N and not 0 <= int(targets.min()) <= int(targets.max()) < V:
        raise IndexError(f"target ids must lie in 0..{V - 1}, got {int(targets.min())}..{int(targets.max())}")
    vchunk = balanced_width(V, vchunk or VCHUNK)  # 24 chunks of 4176 for the book's V = 100,218
    target_logit = np.einsum("nc,nc->n", x2, W[targets]) + b[targets]  # (N,)
    chunk_sum = np.empty((N, -(-V // vchunk)), W.dtype)  # (N, chunks)
    x_shift = np.empty((N, x2.shape[1] + 2), W.dtype)  # (N, C+2) [x, 1, -shift]
    x_shift[:, :-2], x_shift[:, -2] = x2, 1
    ranges = chunk_ranges(V, vchunk)

    def exp_sums(shift):  # (N,) sum over the vocabulary of exp(logits - shift); the exps go into work
        x_shift[:, -1] = -shift
        parallel([(_forward_chunks, x_shift, W, b, work, chunk_sum, share) for share in ranges])
        return chunk_sum.sum(axis=1)

    shift = target_logit
    with np.errstate(over="ignore"):  # an overflow shows as S = inf, just below
        S = exp_sums(shift)
    if not np.isfinite(S).all():  # some logit beat its target's by ~88: shift by each row's max instead
        shift = np.max([(x2 @ W[s:s + vchunk].T + b[s:s + vchunk]).max(axis=1) for s in range(0, V, vchunk)],
                       axis=0)  # (N,) one more pass of products, chunk by chunk
        S = exp_sums(shift)
    loss = (np.log(S) + shift - target_logit).mean()  # ()
    return loss, LinearCrossEntropyCache(x, W, work, 1 / S, targets, vchunk)


def _backward_chunks(x_scaled, scale, W, work, dW, db, dx_sum, chunks):
    """One thread's share of the backward's dense term: rows of dW and db, and the sum of
    e_c @ W_c over its chunks (dx before its row scale)."""
    dx_sum.fill(0)
    for _, s, e in chunks:
        exp = work[:, s:e]  # (N, vchunk) e_c from the forward
        np.matmul(exp.T, x_scaled, out=dW[s:e])  # (vchunk, C)
        np.matmul(scale, exp, out=db[s:e])  # (vchunk,)
        dx_sum += exp @ W[s:e]  # (N, C)


def linear_cross_entropy_backward(dloss, cache, dW_out=None):
    """Returns (dx (..., C), dW (V, C), db (V,)): the plain pair's gradients,

        dlogits = (softmax(logits) - onehot(targets)) * dloss / N
        dx = dlogits @ W,   dW = dlogits.T @ x,   db = dlogits summed over positions

    made chunk by chunk (see the module's docstring).  The cache is only
    read.  dW_out, if given, is a (V, C) NumPy array that receives dW (on
    CuPy, whose memory pool makes allocating cheap, it is not used).
    """
    if isinstance(cache, ComposedCache):
        dlogits = cuda_kernels.cross_entropy_backward(dloss, cache.loss)  # (N, V)
        return linear_backward(dlogits.reshape(cache.linear.x.shape[:-1] + (-1,)), cache.linear)
    x, W = cache.x, cache.W
    (V, C), N = W.shape, cache.work.shape[0]
    dW = np.empty((V, C), x.dtype) if dW_out is None else dW_out  # (V, C)
    db = np.empty(V, x.dtype)  # (V,)
    shares = chunk_ranges(V, cache.vchunk)
    dx_parts = np.empty((len(shares), N, C), x.dtype)  # (threads, N, C) one partial sum per thread
    dloss_over_N = float(dloss) / N
    targets, x2 = cache.targets, x.reshape(N, C)  # (N,), (N, C)
    scale = cache.row_scale * dloss_over_N  # (N,) probs * dloss / N = e_c * scale, row by row
    parallel([(_backward_chunks, x2 * scale[:, None], scale, W, cache.work, dW, db, dx_part, ranges)
              for dx_part, ranges in zip(dx_parts, shares)])
    dx = dx_parts.sum(axis=0) * scale[:, None]  # (N, C)
    scatter_add_rows(dW, targets, x2 * -dloss_over_N)  # minus the one-hot term: only the target rows
    scatter_add(db, targets, np.full(N, -dloss_over_N, x.dtype))
    dx -= W[targets] * dloss_over_N
    return dx.reshape(x.shape), dW, db  # (..., C), (V, C), (V,)
