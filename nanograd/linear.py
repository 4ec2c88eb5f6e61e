"""Linear layer y = x @ W.T + b, with W in PyTorch's (out, in) layout."""
from typing import NamedTuple


class LinearCache(NamedTuple):
    x: object         # (..., IN)
    W: object         # (OUT, IN)
    has_bias: bool


def linear_forward(x, W, b=None):
    """x (..., IN), W (OUT, IN), b (OUT,) or None -> out (..., OUT).  Cache: x, W."""
    out = x @ W.T  # (..., OUT)
    if b is not None:
        out = out + b  # (..., OUT)
    return out, LinearCache(x, W, b is not None)


def linear_backward(dout, cache):
    """Forward was y = x @ W.T + b, so

        dx = dout @ W          (each input feeds every output through W)
        dW = dout.T @ x        (summed over all leading positions)
        db = dout summed over all leading positions

    Returns (dx, dW, db); db is None when there was no bias.  Derivation: docs/linear.md.
    """
    x, W, has_bias = cache
    OUT, IN = W.shape
    dout_rows = dout.reshape(-1, OUT)  # (N, OUT) every leading position a row
    dx = dout @ W  # (..., IN)
    dW = dout_rows.T @ x.reshape(-1, IN)  # (OUT, IN)
    db = dout_rows.sum(axis=0) if has_bias else None  # (OUT,)
    return dx, dW, db
