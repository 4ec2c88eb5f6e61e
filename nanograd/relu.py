"""ReLU: max(x, 0)."""
from typing import NamedTuple


class ReluCache(NamedTuple):
    out: object  # (...) the forward output; out > 0 marks where x > 0


def relu_forward(x):
    """out = max(x, 0).  Cache: out."""
    out = x.clip(min=0)  # (...)
    return out, ReluCache(out)


def relu_backward(dout, cache):
    """The slope is 1 where x > 0 and 0 elsewhere: dx = dout * (out > 0)."""
    dx = dout * (cache.out > 0)  # (...)
    return dx
