"""The check that integer ids index inside a table, the same on NumPy and CuPy."""
from .backend import get_array_module, to_host


def check_ids(ids, n, what):
    """IndexError unless every id lies in 0..n-1.

    NumPy's indexing raises only for ids >= n and silently wraps negative
    ones; CuPy's wraps both (W[idx] reads another row, a plain cross-entropy
    another logit) and the fused cross-entropy kernel returns NaN.  So every
    kernel that indexes with ids checks them first, here.  On CuPy the
    minimum and maximum are one reduction and one 16-byte copy to the host.
    """
    if ids.size == 0:
        return
    xp = get_array_module(ids)
    lo, hi = (int(v) for v in to_host(xp.stack([ids.min(), ids.max()])))
    if lo < 0 or hi >= n:
        raise IndexError(f"{what} must lie in 0..{n - 1}, got {lo}..{hi}")
