"""Layer normalisation over the last axis, as torch.nn.LayerNorm (biased
variance, eps inside the square root)."""
from typing import NamedTuple

EPS = 1e-5


class LayerNormCache(NamedTuple):
    x: object     # (..., C)
    w: object     # (C,)
    mean: object  # (..., 1)
    rstd: object  # (..., 1) 1 / sqrt(var + eps)


def layernorm_forward(x, w, b, eps=EPS):
    """out = (x - mean) / sqrt(var + eps) * w + b over the last axis.

    x (..., C), w (C,), b (C,).  Cache: x, w, mean, rstd (xhat is rebuilt).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1) biased, like torch
    rstd = 1.0 / (var + eps) ** 0.5  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * w + b  # (..., C)
    return out, LayerNormCache(x, w, mean, rstd)


def layernorm_backward(dout, cache):
    """Gradients (dx, dw, db); derivation in docs/layernorm.md.

    out = xhat * w + b, so dw and db sum dout * xhat and dout over every
    position, and dxhat = dout * w.  xhat = (x - mean) * rstd depends on x
    directly and through mean and rstd; the two extra paths subtract the
    parts of dxhat that move the mean and the spread:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
                     direct   via mean     via rstd
    """
    x, w, mean, rstd = cache
    C = x.shape[-1]
    xhat = (x - mean) * rstd  # (..., C)
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    db = dout.reshape(-1, C).sum(axis=0)  # (C,)
    dxhat = dout * w  # (..., C)
    dx = rstd * (dxhat
                 - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (..., C)
    return dx, dw, db
