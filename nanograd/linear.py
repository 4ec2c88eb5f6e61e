"""Linear layer y = x @ W.T + b, with W in PyTorch's (out, in) layout."""
from typing import NamedTuple

from .backend import get_array_module


class LinearCache(NamedTuple):
    x: object         # (..., IN)
    W: object         # (OUT, IN)
    has_bias: bool


def linear_forward(x, W, b=None, out=None):
    """x (..., IN), W (OUT, IN), b (OUT,) or None -> out (..., OUT).  Cache: x, W.

    out, if given, is a (..., OUT) array that receives the result.
    """
    out = get_array_module(x).matmul(x, W.T, out=out)  # (..., OUT)
    if b is not None:
        out += b
    return out, LinearCache(x, W, b is not None)


def linear_backward(dout, cache, dW_out=None):
    """Forward was y = x @ W.T + b, so

        dx = dout @ W          (each input feeds every output through W)
        dW = dout.T @ x        (summed over all leading positions)
        db = dout summed over all leading positions

    Returns (dx, dW, db); db is None when there was no bias.  dW_out, if
    given, is an (OUT, IN) array that receives dW (saves allocating it).
    """
    xp = get_array_module(dout)
    x, W, has_bias = cache
    OUT, IN = W.shape
    dout2 = dout.reshape(-1, OUT)  # (N, OUT)
    dx = dout @ W  # (..., IN)
    dW = xp.matmul(dout2.T, x.reshape(-1, IN), out=dW_out)  # (OUT, IN)
    db = dout2.sum(axis=0) if has_bias else None  # (OUT,)
    return dx, dW, db
