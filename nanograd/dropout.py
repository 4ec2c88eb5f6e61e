"""Inverted dropout, as torch.nn.Dropout: zero each element with probability p
and scale the survivors by 1 / (1 - p), so the expected value is unchanged."""
from typing import NamedTuple


class DropoutCache(NamedTuple):
    keep: object  # (...) 0 where dropped, 1/(1-p) where kept; None in eval mode


def dropout_forward(x, p, rng, train=True):
    """out = x * keep.  Identity when not training or p == 0.  Cache: keep.

    rng is the backend's generator (backend.make_rng); the mask is drawn
    from it, so the same seed gives the same mask.
    """
    if not train or p == 0.0:
        return x, DropoutCache(None)
    keep = (rng.random(x.shape, dtype=x.dtype) >= p) * x.dtype.type(1.0 / (1.0 - p))  # (...)
    out = x * keep  # (...)
    return out, DropoutCache(keep)


def dropout_backward(dout, cache):
    """out = x * keep elementwise, so dx = dout * keep."""
    if cache.keep is None:
        return dout
    dx = dout * cache.keep  # (...)
    return dx
