"""Embedding lookup: each token id picks one row of a table."""
from typing import NamedTuple

from .backend import get_array_module, scatter_add
from .ids import check_ids


class EmbeddingCache(NamedTuple):
    idx: object       # (B, T) int token ids
    W_shape: tuple    # (V, C)


def embedding_forward(idx, W):
    """out[b, t] = W[idx[b, t]].  idx (B, T) ints, W (V, C).  Cache: idx, W's shape.

    An id outside 0..V-1 raises IndexError (CuPy's indexing would wrap it).
    """
    check_ids(idx, W.shape[0], "token ids")
    out = W[idx]  # (B, T, C)
    return out, EmbeddingCache(idx, W.shape)


def embedding_backward(dout, cache):
    """dW[v] = sum of dout[b, t] over every position where idx[b, t] == v.

    A token id that appears twice receives both upstream rows, so the rows
    are scatter-added; `dW[idx] += dout` would keep only one of them.
    The ids are integers and get no gradient: returns dW alone.  Derivation: docs/embedding.md.
    """
    xp = get_array_module(dout)
    V, C = cache.W_shape
    dW = xp.zeros((V, C), dtype=dout.dtype)  # (V, C)
    scatter_add(dW, cache.idx.reshape(-1), dout.reshape(-1, C))
    return dW
