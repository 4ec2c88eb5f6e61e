"""The blocks' kernels on every CPU core: drop-in twins of the plain NumPy kernels, cut by rows.

Where the output layer is small (nanoGPT's char-level config: B*T = 768 rows,
C = 128, V = 65) the blocks are the whole step, and the plain kernels run them
on one core (BLAS is single-threaded for the fused head's sake, train.py).
Each kernel here computes the same function as its plain twin with the rows
(positions) cut into one share per CPU thread (threads.parallel); each thread
runs its share's operations one after another while they sit in cache, into
arrays made once per call, with in-place NumPy operations instead of fresh
temporaries.  Weight gradients, sums over every row, are either cut by output
column or summed from one partial per thread.  Each kernel's threads= caps its
shares: batch_split.py, which already gives each core a share of the batch,
runs them with threads=1, on the calling thread alone.

    nanograd.linear.linear_forward / linear_backward
        -> linear_forward / linear_backward: rows of x @ W.T + b per thread;
           backward: rows of dx, and columns of dW and db, per thread
    nanograd.relu.relu_forward / relu_backward -> relu_forward / relu_backward
    nanograd.layernorm.layernorm_forward / layernorm_backward
        -> layernorm_forward / layernorm_backward: two passes over a share forward,
           partial dw and db per thread backward
    nanograd.backend.scatter_add of rows (the embedding's and the output layer's backward)
        -> scatter_add_rows: one np.add.at over flat element indices, on the calling thread
    nanograd.attention.attention_forward / attention_backward
        -> attention_forward / attention_backward: q, k and v by one product with
           the three weights stacked, every head of a share of the batch at once;
           the dropout mask (if any) drawn whole on the calling thread, as the plain
           kernel draws it, so the same generator gives the same mask

The caches are the plain kernels' NamedTuples (the plain backward accepts
them too).  On other arrays than NumPy's each function is its plain twin.
Equal to the plain kernels to rounding: tests/test_fast_cpu_kernels.py.
"""
import itertools

import numpy as np

from .. import attention as plain_attention
from .. import layernorm as plain_layernorm
from .. import linear as plain_linear
from .. import relu as plain_relu
from ..attention import AttentionCache, causal_bias
from ..backend import scatter_add as plain_scatter_add
from ..dropout import DropoutCache
from ..layernorm import EPS, LayerNormCache
from ..linear import LinearCache
from ..relu import ReluCache
from .threads import cpu_threads, split_range, submit


def parallel(tasks):
    """threads.parallel, with the calling thread working too: it runs the first task, then
    takes back every task no pool thread has started yet (the pool may be busy, as with
    FastAdamW.start's update of the output layer, or its threads descheduled on a shared
    machine) and waits only for those already running."""
    if not tasks:  # no rows
        return []
    futures = submit(tasks[1:])
    function, *args = tasks[0]
    results = [function(*args)]
    for future, (function, *args) in zip(futures, tasks[1:]):
        results.append(function(*args) if future.cancel() else future.result())
    return results


# Below these a second thread costs more than it saves (handing a task over is ~20 us,
# more on a busy machine): the kernel runs on the calling thread alone.
MIN_FLOPS = 1 << 22     # matrix FLOPs per share (a (768, 128) x (128, 512) product is 50M)
MIN_ELEMENTS = 1 << 20  # elements per share of elementwise work (ReLU, LayerNorm)


def row_shares(n, work, min_work, threads=None):
    """(start, stop) of each thread's rows: one share per thread (threads, or every CPU thread if
    None), fewer when `work` (FLOPs or elements in all) would give a share less than min_work."""
    return split_range(n, max(1, min(threads or cpu_threads(), int(work // min_work))))


# ---- linear ---------------------------------------------------------------

def linear_forward(x, W, b=None, threads=None):
    """nanograd.linear_forward: out = x @ W.T + b, the rows cut over the threads.  Cache: LinearCache."""
    if not isinstance(x, np.ndarray):
        return plain_linear.linear_forward(x, W, b)
    OUT, IN = W.shape
    x_rows = x.reshape(-1, IN)  # (N, IN)
    out = np.empty((x_rows.shape[0], OUT), np.result_type(x, W))  # (N, OUT)
    shares = row_shares(len(out), 2 * out.size * IN, MIN_FLOPS, threads)
    parallel([(_linear_rows, x_rows[s:e], W, b, out[s:e]) for s, e in shares])
    return out.reshape(x.shape[:-1] + (OUT,)), LinearCache(x, W, b is not None)  # (..., OUT)


def _linear_rows(x, W, b, out):
    np.matmul(x, W.T, out=out)  # (n, OUT)
    if b is not None:
        out += b


def linear_backward(dout, cache, threads=None):
    """nanograd.linear_backward: dx = dout @ W by rows, dW = dout.T @ x and db by output columns."""
    if not isinstance(dout, np.ndarray):
        return plain_linear.linear_backward(dout, cache)
    x, W, has_bias = cache
    OUT, IN = W.shape
    dout_rows, x_rows = dout.reshape(-1, OUT), x.reshape(-1, IN)  # (N, OUT), (N, IN)
    dtype = np.result_type(dout, W)
    dx = np.empty((dout_rows.shape[0], IN), dtype)  # (N, IN)
    dW = np.empty((OUT, IN), dtype)  # (OUT, IN)
    db = np.empty(OUT, dtype) if has_bias else None  # (OUT,)
    parallel([(_linear_backward_share, dout_rows, x_rows, W, dx, dW, db, rows, cols)  # a share of each, or of one
              for rows, cols in itertools.zip_longest(row_shares(len(dx), 2 * dx.size * OUT, MIN_FLOPS, threads),
                                                         row_shares(OUT, 2 * dW.size * len(dx), MIN_FLOPS, threads),
                                                         fillvalue=(0, 0))])
    return dx.reshape(dout.shape[:-1] + (IN,)), dW, db  # (..., IN), (OUT, IN), (OUT,)


def _linear_backward_share(dout, x, W, dx, dW, db, rows, cols):
    (r0, r1), (c0, c1) = rows, cols
    if r1 > r0:
        np.matmul(dout[r0:r1], W, out=dx[r0:r1])  # (n, IN)
    if c1 > c0:
        np.matmul(dout[:, c0:c1].T, x, out=dW[c0:c1])  # (cols, IN) summed over every row
        if db is not None:
            np.sum(dout[:, c0:c1], axis=0, out=db[c0:c1])  # (cols,)


# ---- relu -----------------------------------------------------------------

def relu_forward(x, threads=None):
    """nanograd.relu_forward: out = max(x, 0) by rows.  Cache: ReluCache(out)."""
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        return plain_relu.relu_forward(x)
    out = np.empty_like(x)  # (...)
    x_rows, out_rows = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])  # (N, D)
    parallel([(_relu_rows, x_rows[s:e], out_rows[s:e])
              for s, e in row_shares(len(x_rows), x.size, MIN_ELEMENTS, threads)])
    return out, ReluCache(out)


def _relu_rows(x, out):
    np.maximum(x, 0, out=out)  # (n, D)


def relu_backward(dout, cache, threads=None):
    """nanograd.relu_backward: dx = dout where out > 0, else 0, by rows."""
    if not isinstance(dout, np.ndarray) or dout.ndim == 0:
        return plain_relu.relu_backward(dout, cache)
    dx = np.empty_like(dout)  # (...)
    D = dout.shape[-1]
    dout_rows, out_rows, dx_rows = dout.reshape(-1, D), cache.out.reshape(-1, D), dx.reshape(-1, D)  # (N, D)
    parallel([(_relu_backward_rows, dout_rows[s:e], out_rows[s:e], dx_rows[s:e])
              for s, e in row_shares(len(dx_rows), dx.size, MIN_ELEMENTS, threads)])
    return dx


def _relu_backward_rows(dout, out, dx):
    np.multiply(dout, out > 0, out=dx)  # (n, D)


# ---- layernorm ------------------------------------------------------------

def layernorm_forward(x, w, b, eps=EPS, threads=None):
    """nanograd.layernorm_forward by rows: a pass for the mean, one for the variance
    (of x - mean, as the plain kernel, not E[x^2] - mean^2, which cancels), then the
    output made in place.  Cache: LayerNormCache(x, w, mean, rstd)."""
    if not isinstance(x, np.ndarray):
        return plain_layernorm.layernorm_forward(x, w, b, eps)
    C = x.shape[-1]
    x_rows = x.reshape(-1, C)  # (N, C)
    N = x_rows.shape[0]
    out = np.empty_like(x_rows)  # (N, C)
    mean = np.empty((N, 1), x.dtype)  # (N, 1)
    rstd = np.empty((N, 1), x.dtype)  # (N, 1)
    parallel([(_layernorm_rows, x_rows[s:e], w, b, eps, out[s:e], mean[s:e], rstd[s:e])
              for s, e in row_shares(N, x.size, MIN_ELEMENTS, threads)])
    stats = x.shape[:-1] + (1,)
    return out.reshape(x.shape), LayerNormCache(x, w, mean.reshape(stats), rstd.reshape(stats))


def _layernorm_rows(x, w, b, eps, out, mean, rstd):
    C = x.shape[1]
    np.mean(x, axis=1, keepdims=True, out=mean)  # (n, 1)
    np.subtract(x, mean, out=out)  # (n, C) xc
    var = np.einsum("nc,nc->n", out, out)[:, None] / C  # (n, 1) biased
    np.sqrt(var + eps, out=rstd)
    np.divide(1.0, rstd, out=rstd)  # (n, 1)
    out *= rstd  # (n, C) xhat
    out *= w
    out += b


def layernorm_backward(dout, cache, threads=None):
    """nanograd.layernorm_backward by rows, with each thread's partial dw and db summed at the end:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * w
    """
    if not isinstance(dout, np.ndarray):
        return plain_layernorm.layernorm_backward(dout, cache)
    x, w, mean, rstd = cache
    C = x.shape[-1]
    x_rows, dout_rows = x.reshape(-1, C), dout.reshape(-1, C)  # (N, C)
    mean_rows, rstd_rows = mean.reshape(-1, 1), rstd.reshape(-1, 1)  # (N, 1)
    shares = row_shares(len(x_rows), x.size, MIN_ELEMENTS, threads)
    dx = np.empty_like(dout_rows)  # (N, C)
    partial = np.empty((len(shares), 2, C), dx.dtype)  # (threads, [dw, db], C)
    parallel([(_layernorm_backward_rows, x_rows[s:e], dout_rows[s:e], w, mean_rows[s:e], rstd_rows[s:e],
               dx[s:e], part) for (s, e), part in zip(shares, partial)])
    dw, db = partial.sum(axis=0)  # (C,), (C,)
    return dx.reshape(dout.shape), dw, db


def _layernorm_backward_rows(x, dout, w, mean, rstd, dx, partial):
    C = x.shape[1]
    xhat = x - mean  # (n, C)
    xhat *= rstd
    np.einsum("nc,nc->c", dout, xhat, out=partial[0])  # (C,) dw's share
    np.sum(dout, axis=0, out=partial[1])  # (C,) db's share
    np.multiply(dout, w, out=dx)  # (n, C) dxhat
    mean_dxhat = dx.sum(axis=1, keepdims=True) / C  # (n, 1)
    mean_dxhat_xhat = np.einsum("nc,nc->n", dx, xhat)[:, None] / C  # (n, 1)
    dx -= mean_dxhat
    xhat *= mean_dxhat_xhat
    dx -= xhat
    dx *= rstd


# ---- scatter-add ----------------------------------------------------------

def scatter_add_rows(out, idx, rows):
    """nanograd.backend.scatter_add for a (V, C) out and (N, C) rows on NumPy: out[idx[n]] += rows[n].

    np.add.at over rows takes ~1 us a row; over the flat element indices
    idx[n] * C + c it runs its fast one-dimensional loop, ~5x faster.  Each
    element still gets its rows' values in the order of n: the same numbers."""
    if not isinstance(out, np.ndarray) or not out.flags.c_contiguous:  # (out.reshape(-1) must be a view)
        return plain_scatter_add(out, idx, rows)
    C = out.shape[1]
    flat_idx = idx.reshape(-1, 1) * C + np.arange(C)  # (N, C) where each element of rows goes in out
    np.add.at(out.reshape(-1), flat_idx.reshape(-1), rows.reshape(-1))


# ---- attention ------------------------------------------------------------

def stacked_qkv(Wq, Wk, Wv):
    """(NH, hs, C) x 3 -> (3*NH*hs, C): q, k and v of every head from one product."""
    NH, hs, C = Wq.shape
    return np.concatenate([Wq.reshape(NH * hs, C), Wk.reshape(NH * hs, C), Wv.reshape(NH * hs, C)])


def attention_flops(B, T, C, D):
    """Matrix FLOPs of attention_forward: q, k, v (D = NH*hs columns each), q @ k.T and att @ v."""
    return 2 * B * T * C * 3 * D + 2 * 2 * B * T * T * D


def attention_forward(x, Wq, Wk, Wv, dropout_p=0.0, rng=None, train=True, threads=None):
    """nanograd.attention_forward with the batch cut over the threads.  Cache: AttentionCache,
    whose q, k, v are views into one (B, T, 3, NH, hs) array."""
    if not isinstance(x, np.ndarray):
        return plain_attention.attention_forward(x, Wq, Wk, Wv, dropout_p, rng, train)
    B, T, C = x.shape
    NH, hs, _ = Wq.shape
    qkv = np.empty((B, T, 3, NH, hs), np.result_type(x, Wq))  # (B, T, 3, NH, hs)
    att = np.empty((B, NH, T, T), qkv.dtype)  # (B, NH, T, T)
    out = np.empty((B, T, NH * hs), qkv.dtype)  # (B, T, NH*hs)
    keep = None
    if train and dropout_p != 0.0:  # dropout_forward's draw of the mask, whole, on this thread
        keep = (rng.random(att.shape, dtype=att.dtype) >= dropout_p) * att.dtype.type(1.0 / (1.0 - dropout_p))
    W = stacked_qkv(Wq, Wk, Wv)  # (3*NH*hs, C)
    parallel([(_attention_batches, x[s:e], W, qkv[s:e], att[s:e], None if keep is None else keep[s:e], out[s:e])
              for s, e in row_shares(B, attention_flops(B, T, C, NH * hs), MIN_FLOPS, threads)])
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, NH, T, hs) each
    return out, AttentionCache(x, Wq, Wk, Wv, q, k, v, att, DropoutCache(keep))


def _attention_batches(x, W, qkv, att, keep, out):
    b, T, C = x.shape
    _, _, _, NH, hs = qkv.shape
    np.matmul(x.reshape(b * T, C), W.T, out=qkv.reshape(b * T, -1))  # (b*T, 3*NH*hs)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (b, NH, T, hs) each
    np.matmul(q, k.transpose(0, 1, 3, 2), out=att)  # (b, NH, T, T)
    att *= 1.0 / hs ** 0.5
    att += causal_bias(np, T, att.dtype)  # the future gets -inf
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)  # (b, NH, T, T) softmax over the keys
    att_drop = att if keep is None else att * keep  # (b, NH, T, T)
    y = att_drop @ v  # (b, NH, T, hs)
    out.reshape(b, T, NH, hs)[...] = y.transpose(0, 2, 1, 3)


def attention_backward(dout, cache, threads=None):
    """nanograd.attention_backward with the batch cut over the threads: each thread makes its
    share's dq, dk, dv (side by side, as the stacked product made them), its rows of dx, and
    a partial of the stacked weights' gradient, summed at the end."""
    if not isinstance(dout, np.ndarray):
        return plain_attention.attention_backward(dout, cache)
    x, Wq, Wk, Wv, q, k, v, att, dropout_cache = cache
    B, T, C = x.shape
    NH, hs, _ = Wq.shape
    W = stacked_qkv(Wq, Wk, Wv)  # (3*NH*hs, C)
    shares = row_shares(B, 2 * attention_flops(B, T, C, NH * hs), MIN_FLOPS, threads)
    dx = np.empty((B, T, C), np.result_type(dout, W))  # (B, T, C)
    dW = np.empty((len(shares), 3 * NH * hs, C), dx.dtype)  # (threads, 3*NH*hs, C) partial sums
    keep = dropout_cache.keep
    parallel([(_attention_backward_batches, dout[s:e], x[s:e], W, q[s:e], k[s:e], v[s:e], att[s:e],
               None if keep is None else keep[s:e], dx[s:e], dW_part)
              for (s, e), dW_part in zip(shares, dW)])
    dW = dW.sum(axis=0)  # (3*NH*hs, C)
    dWq, dWk, dWv = dW.reshape(3, NH, hs, C)  # (NH, hs, C) each
    return dx, dWq, dWk, dWv


def _attention_backward_batches(dout, x, W, q, k, v, att, keep, dx, dW):
    """See nanograd.attention.attention_backward for each line's derivation."""
    b, T, C = x.shape
    _, NH, _, hs = q.shape
    scale = 1.0 / hs ** 0.5
    dy = dout.reshape(b, T, NH, hs).transpose(0, 2, 1, 3)  # (b, NH, T, hs)
    dqkv = np.empty((b, T, 3, NH, hs), dx.dtype)  # (b, T, 3, NH, hs) laid out as the stacked product
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # (b, NH, T, hs) views
    att_drop = att if keep is None else att * keep  # (b, NH, T, T)
    np.matmul(att_drop.transpose(0, 1, 3, 2), dy, out=dv)  # (b, NH, T, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (b, NH, T, T)
    if keep is not None:
        datt *= keep
    datt -= (datt * att).sum(axis=-1, keepdims=True)
    datt *= att  # (b, NH, T, T) dpreatt
    datt *= scale
    np.matmul(datt, k, out=dq)  # (b, NH, T, hs)
    np.matmul(datt.transpose(0, 1, 3, 2), q, out=dk)  # (b, NH, T, hs)
    dqkv_rows = dqkv.reshape(b * T, 3 * NH * hs)  # (b*T, 3*NH*hs)
    np.matmul(dqkv_rows, W, out=dx.reshape(b * T, C))  # (b*T, C) the three paths summed
    np.matmul(dqkv_rows.T, x.reshape(b * T, C), out=dW)  # (3*NH*hs, C)
