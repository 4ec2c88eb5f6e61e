"""Causal multi-head self-attention, as the book's model computes it.

Each head h has its own bias-free projections Wq[h], Wk[h], Wv[h] of shape
(hs, C) and computes softmax(mask(q @ k.T / sqrt(hs))) @ v with dropout on
the attention weights; the heads' outputs are concatenated.  All heads run
at once as one batched array of shape (B, NH, T, ...), no loop over heads.
The projection after the concatenation is a separate linear layer.
"""
import functools
from typing import NamedTuple

from .backend import get_array_module
from .dropout import dropout_forward, dropout_backward


class AttentionCache(NamedTuple):
    x: object          # (B, T, C)
    Wq: object         # (NH, hs, C)
    Wk: object         # (NH, hs, C)
    Wv: object         # (NH, hs, C)
    q: object          # (B, NH, T, hs)
    k: object          # (B, NH, T, hs)
    v: object          # (B, NH, T, hs)
    att: object        # (B, NH, T, T) softmax weights, before dropout
    dropout: object    # DropoutCache of the attention weights


def project_heads(x, W):
    """Project x (B, T, C) with every head's W (NH, hs, C) -> (B, NH, T, hs)."""
    B, T, C = x.shape
    NH, hs, _ = W.shape
    y = x @ W.reshape(NH * hs, C).T  # (B, T, NH*hs)
    return y.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)


def merge_heads(y):
    """(B, NH, T, hs) -> (B*T, NH*hs), heads side by side (their concatenation)."""
    B, NH, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B * T, NH * hs)  # (B*T, NH*hs)


@functools.lru_cache(maxsize=16)
def causal_bias(xp, T, dtype):
    """(T, T) 0 on and below the diagonal, -inf above it: added to the scores, it hides
    from position t the positions after t, since exp(-inf) = 0.  Made once per T."""
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)  # (T, T)
    return xp.where(future, -xp.inf, 0.0).astype(dtype)  # (T, T)


def causal_softmax_forward(preatt):
    """att = softmax over the last axis of preatt (..., T, T), row t seeing only keys 0..t.

    The cache is att itself (the backward needs nothing else).
    """
    xp = get_array_module(preatt)
    scores = preatt + causal_bias(xp, preatt.shape[-1], preatt.dtype)  # (..., T, T) the future gets -inf
    scores = scores - scores.max(axis=-1, keepdims=True)  # (..., T, T) the diagonal is always finite
    exp = xp.exp(scores)  # (..., T, T) the future gets exp(-inf) = 0
    return exp / exp.sum(axis=-1, keepdims=True)  # (..., T, T) softmax over the keys


def causal_softmax_backward(datt, att):
    """dpreatt = att * (datt - sum_j(datt * att)): the softmax's Jacobian applied to datt.

    Per row, a = softmax(z) has Jacobian J = diag(a) - a a^T (da_i/dz_j =
    a_i (delta_ij - a_j)).  J is symmetric, so J^T d = a * d - a (a . d) =
    a * (d - sum(a * d)): O(T) a row, the (T, T) Jacobian never built.
    Masked entries have att = 0, so they get 0.  Derivation: docs/attention.md.
    """
    return att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (..., T, T)


def attention_forward(x, Wq, Wk, Wv, dropout_p=0.0, rng=None, train=True, softmax=causal_softmax_forward):
    """x (B, T, C), Wq/Wk/Wv (NH, hs, C) -> out (B, T, NH*hs).

    Cache: x, the weights, q, k, v, the softmax weights att, the dropout mask.
    softmax: the causal softmax above (nanograd.fast.cuda_kernels passes its
    one-kernel twin; the walk is the same).
    """
    B, T, C = x.shape
    NH, hs, _ = Wq.shape
    q, k, v = project_heads(x, Wq), project_heads(x, Wk), project_heads(x, Wv)  # (B, NH, T, hs) each
    preatt = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / hs ** 0.5)  # (B, NH, T, T)
    att = softmax(preatt)  # (B, NH, T, T)
    att_drop, dropout_cache = dropout_forward(att, dropout_p, rng, train)  # (B, NH, T, T)
    y = att_drop @ v  # (B, NH, T, hs)
    out = merge_heads(y).reshape(B, T, NH * hs)  # (B, T, NH*hs)
    return out, AttentionCache(x, Wq, Wk, Wv, q, k, v, att, dropout_cache)


def attention_backward(dout, cache, softmax_backward=causal_softmax_backward):
    """Gradients (dx, dWq, dWk, dWv), walking the forward in reverse (docs/attention.md).

    y = att_drop @ v         ->  datt_drop = dy @ v.T,  dv = att_drop.T @ dy
    att_drop = dropout(att)  ->  datt = datt_drop * keep
    att = softmax(preatt)    ->  dpreatt = att * (datt - sum_j(datt * att))
                                 (masked entries have att = 0, so get 0)
    preatt = q @ k.T * scale ->  dq = dpreatt @ k * scale,  dk = dpreatt.T @ q * scale
                                 (scale = 1/sqrt(hs); docs/attention.md calls preatt s)
    q = x @ Wq[h].T per head ->  dWq = dq.T @ x,  and likewise for k and v;
                                 x feeds all three, so dx sums dq @ Wq + dk @ Wk + dv @ Wv.
    """
    x, Wq, Wk, Wv, q, k, v, att, dropout_cache = cache
    B, T, C = x.shape
    NH, hs, _ = Wq.shape
    scale = 1.0 / hs ** 0.5
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    att_drop = att if dropout_cache.keep is None else att * dropout_cache.keep  # (B, NH, T, T)
    datt_drop = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    dv = att_drop.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, hs)
    datt = dropout_backward(datt_drop, dropout_cache)  # (B, NH, T, T)
    dpreatt = softmax_backward(datt, att)  # (B, NH, T, T)
    dq = (dpreatt @ k) * scale  # (B, NH, T, hs)
    dk = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale  # (B, NH, T, hs)
    # q, k and v are three linear projections of the same x: each gives its weights a
    # gradient, and x, which fed all three, gets the sum of the three paths back.
    x_rows = x.reshape(B * T, C)  # (B*T, C) every position a row
    dq_rows, dk_rows, dv_rows = merge_heads(dq), merge_heads(dk), merge_heads(dv)  # (B*T, NH*hs) each
    dWq = (dq_rows.T @ x_rows).reshape(NH, hs, C)  # (NH, hs, C)
    dWk = (dk_rows.T @ x_rows).reshape(NH, hs, C)  # (NH, hs, C)
    dWv = (dv_rows.T @ x_rows).reshape(NH, hs, C)  # (NH, hs, C)
    dx_rows = (dq_rows @ Wq.reshape(NH * hs, C)
               + dk_rows @ Wk.reshape(NH * hs, C)
               + dv_rows @ Wv.reshape(NH * hs, C))  # (B*T, C)
    return dx_rows.reshape(B, T, C), dWq, dWk, dWv
