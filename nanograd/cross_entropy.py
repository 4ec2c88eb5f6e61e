"""Softmax cross-entropy, fused: mean over positions of -log softmax(logits)[target]."""
import os
from typing import NamedTuple

import numpy as np

from .backend import fused_kernels, get_array_module, parallel, split_range


class CrossEntropyCache(NamedTuple):
    probs: object    # (N, V) softmax of the logits
    targets: object  # (N,) int


def cross_entropy_forward(logits, targets):
    """loss = mean_n(logsumexp(logits[n]) - logits[n, targets[n]]).

    logits (N, V), targets (N,) ints -> loss, a 0-d array.  Cache: probs, targets.
    The row max is subtracted before exp, so no exp overflows.
    """
    if fused := fused_kernels(logits):  # CuPy: the same in one CUDA kernel
        return fused.cross_entropy_forward(logits, targets)
    xp = get_array_module(logits)
    N = logits.shape[0]
    rows = xp.arange(N)  # (N,)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (N, V) every row's max is 0
    exp = xp.exp(shifted)  # (N, V)
    sumexp = exp.sum(axis=-1, keepdims=True)  # (N, 1)
    loss = (xp.log(sumexp[:, 0]) - shifted[rows, targets]).mean()  # ()
    probs = exp / sumexp  # (N, V)
    return loss, CrossEntropyCache(probs, targets)


def cross_entropy_backward(dloss, cache):
    """d loss / d logits[n] = (softmax(logits[n]) - onehot(targets[n])) / N.

    The one-hot is never built: 1 is subtracted at [rows, targets].
    The targets are integers and get no gradient: returns dlogits alone.
    """
    if fused := fused_kernels(cache.probs):  # CuPy: the same in one CUDA kernel
        return fused.cross_entropy_backward(dloss, cache)
    xp = get_array_module(cache.probs)
    probs, targets = cache
    N = probs.shape[0]
    dlogits = probs.copy()  # (N, V)
    dlogits[xp.arange(N), targets] -= 1.0
    dlogits *= dloss / N
    return dlogits


# ---- the fast path: the same loss and gradient with no (N, V) temporaries ------------------

class CrossEntropyBuffersCache(NamedTuple):
    exp: object      # (N, V) exp(logits - rowmax), unnormalised; becomes dlogits in backward
    sumexp: object   # (N, 1)
    targets: object  # (N,) int


ROWS = 4  # rows per block: 4 rows of a 100k vocabulary (1.6 MB float32) stay in cache


def _exp_rows(logits, exp, rowmax, sumexp, start, stop):
    """exp = exp(logits - rowmax) and its row sums, for rows start..stop, a cache-sized block at a time."""
    xp = get_array_module(logits)
    rows = ROWS if xp is np else stop - start  # a GPU takes all rows in one launch
    for first in range(start, stop, rows):
        b = slice(first, min(first + rows, stop))
        logits[b].max(axis=-1, keepdims=True, out=rowmax[b])
        xp.subtract(logits[b], rowmax[b], out=exp[b])
        xp.exp(exp[b], out=exp[b])
        exp[b].sum(axis=-1, keepdims=True, out=sumexp[b])


def _scale_rows(exp, scale, start, stop):
    """exp[rows] *= scale[rows] for rows start..stop."""
    rows = ROWS if get_array_module(exp) is np else stop - start
    for first in range(start, stop, rows):
        b = slice(first, min(first + rows, stop))
        exp[b] *= scale[b]


def _over_rows(function, N, *arrays):
    """function(*arrays, start, stop) over all N rows: on NumPy split among the CPU threads."""
    if get_array_module(arrays[0]) is np:
        parallel([(function, *arrays, start, stop) for start, stop in split_range(N, os.cpu_count() or 1, ROWS)])
    else:
        function(*arrays, 0, N)


def cross_entropy_forward_into(logits, targets, exp):
    """cross_entropy_forward, writing into the preallocated exp (N, V) instead of new arrays.

    Row block by row block: max, subtract, exp and sum pass over a block
    while it is in cache (on NumPy the CPU threads take a share of the rows
    each).  The softmax is left unnormalised (exp and sumexp); the backward
    folds the 1/sumexp into the one pass it makes.
    """
    if fused := fused_kernels(logits, exp):  # CuPy: the same in one CUDA kernel
        return fused.cross_entropy_forward_into(logits, targets, exp)
    xp = get_array_module(logits)
    N = logits.shape[0]
    rowmax = xp.empty((N, 1), dtype=logits.dtype)  # (N, 1)
    sumexp = xp.empty((N, 1), dtype=logits.dtype)  # (N, 1)
    _over_rows(_exp_rows, N, logits, exp, rowmax, sumexp)
    target_logit = logits[xp.arange(N), targets]  # (N,)
    loss = (xp.log(sumexp[:, 0]) - (target_logit - rowmax[:, 0])).mean()  # ()
    return loss, CrossEntropyBuffersCache(exp, sumexp, targets)


def cross_entropy_backward_into(dloss, cache):
    """cross_entropy_backward in place: cache.exp becomes dlogits = (probs - onehot) * dloss / N.

    One pass scales each row by dloss / (N * sumexp), turning exp into the
    scaled probabilities; then dloss / N comes off at [rows, targets].  The
    cache is used up.
    """
    if fused := fused_kernels(cache.exp, cache.sumexp):  # CuPy: the same in one CUDA kernel
        return fused.cross_entropy_backward_into(dloss, cache)
    xp = get_array_module(cache.exp)
    exp, sumexp, targets = cache
    N = exp.shape[0]
    _over_rows(_scale_rows, N, exp, (dloss / N) / sumexp)
    exp[xp.arange(N), targets] -= dloss / N
    return exp  # (N, V) dlogits
