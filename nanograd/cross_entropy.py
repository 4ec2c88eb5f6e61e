"""Softmax cross-entropy, fused: mean over positions of -log softmax(logits)[target]."""
from typing import NamedTuple

from .backend import get_array_module


class CrossEntropyCache(NamedTuple):
    probs: object    # (N, V) softmax of the logits
    targets: object  # (N,) int


def cross_entropy_forward(logits, targets):
    """loss = mean_n(logsumexp(logits[n]) - logits[n, targets[n]]).

    logits (N, V), targets (N,) ints -> loss, a 0-d array.  Cache: probs, targets.
    The row max is subtracted before exp, so no exp overflows.
    """
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


def cross_entropy_forward_into(logits, targets, exp):
    """cross_entropy_forward, writing into the preallocated exp (N, V) instead of new arrays.

    Row block by row block: max, subtract, exp and sum pass over a block
    while it is in cache.  The softmax is left unnormalised (exp and
    sumexp); the backward folds the 1/sumexp into the one pass it makes.
    """
    xp = get_array_module(logits)
    N = logits.shape[0]
    sumexp = xp.empty((N, 1), dtype=logits.dtype)  # (N, 1)
    target_logit = logits[xp.arange(N), targets]  # (N,)
    rowmax = xp.empty((N, 1), dtype=logits.dtype)  # (N, 1)
    for start in range(0, N, ROWS):
        b = slice(start, start + ROWS)
        logits[b].max(axis=-1, keepdims=True, out=rowmax[b])
        xp.subtract(logits[b], rowmax[b], out=exp[b])
        xp.exp(exp[b], out=exp[b])
        exp[b].sum(axis=-1, keepdims=True, out=sumexp[b])
    loss = (xp.log(sumexp[:, 0]) - (target_logit - rowmax[:, 0])).mean()  # ()
    return loss, CrossEntropyBuffersCache(exp, sumexp, targets)


def cross_entropy_backward_into(dloss, cache):
    """cross_entropy_backward in place: cache.exp becomes dlogits = (probs - onehot) * dloss / N.

    One pass scales each row by dloss / (N * sumexp), turning exp into the
    scaled probabilities; then dloss / N comes off at [rows, targets].  The
    cache is used up.
    """
    xp = get_array_module(cache.exp)
    exp, sumexp, targets = cache
    N = exp.shape[0]
    scale = (dloss / N) / sumexp  # (N, 1)
    for start in range(0, N, ROWS):
        b = slice(start, start + ROWS)
        exp[b] *= scale[b]
    exp[xp.arange(N), targets] -= dloss / N
    return exp  # (N, V) dlogits
