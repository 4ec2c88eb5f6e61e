"""Softmax and cross-entropy as one op: mean over positions of -log softmax(logits)[target].  Derivation: docs/cross_entropy.md."""
from typing import NamedTuple

from .backend import get_array_module
from .ids import check_ids


class CrossEntropyCache(NamedTuple):
    probs: object    # (N, V) softmax of the logits
    targets: object  # (N,) int


def cross_entropy_forward(logits, targets):
    """loss = mean_n(logsumexp(logits[n]) - logits[n, targets[n]]).

    logits (N, V), targets (N,) ints -> loss, a 0-d array.  Cache: probs, targets.
    The row max is subtracted before exp, so no exp overflows.  A target
    outside 0..V-1 raises IndexError (CuPy's indexing would wrap it).
    """
    check_ids(targets, logits.shape[-1], "target ids")
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
