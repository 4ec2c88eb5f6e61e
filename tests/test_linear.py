"""Tests for nanograd/linear.py: y = x @ W.T + b."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.backend import to_host
from nanograd.linear import linear_backward, linear_forward

# float64 against torch: dot products of at most a few dozen terms, summed in
# a different order by different BLAS kernels, differ by ~1e-16 relative to
# the terms; the rtol 1e-9, and atol 1e-12 for sums that cancel to
# about 0 (where a relative bound means nothing).
# float32 against torch float64 on the same float32 values: each product and
# sum rounds to float32 (unit roundoff 6e-8), a few dozen terms give ~1e-6
# relative to the terms, so rtol 1e-5 and atol 1e-6 for cancelling sums.
TOL = {"float64": dict(rtol=1e-9, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])
leading_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)  # (...), also none


@given(lead=leading_shapes, IN=st.integers(1, 4), OUT=st.integers(1, 4), bias=st.booleans(),
       x_layout=layouts, W_layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, lead, IN, OUT, bias,
                                             x_layout, W_layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, rng.standard_normal(lead + (IN,)), x_layout)  # (..., IN)
    W = relayout(xp, rng.standard_normal((OUT, IN)), W_layout)  # (OUT, IN)
    if bias:
        b = xp.asarray(rng.standard_normal(OUT))  # (OUT,)
        gradcheck("linear", linear_forward, linear_backward, [x, W, b], [0, 1, 2], ["x", "W", "b"], seed)
    else:
        # backward returns (dx, dW, None); the check takes the first two
        gradcheck("linear", linear_forward, lambda d, c: linear_backward(d, c)[:2], [x, W],
                  [0, 1], ["x", "W"], seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(lead=leading_shapes, IN=st.integers(1, 6), OUT=st.integers(1, 6), bias=st.booleans(),
       layout=layouts, seed=seeds)
def test_matches_torch(xp, host, relayout, dtype, lead, IN, OUT, bias, layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, rng.standard_normal(lead + (IN,)).astype(dtype), layout)  # (..., IN)
    W = relayout(xp, rng.standard_normal((OUT, IN)).astype(dtype), layout)  # (OUT, IN)
    b = xp.asarray(rng.standard_normal(OUT).astype(dtype)) if bias else None  # (OUT,)
    dout = xp.asarray(rng.standard_normal(lead + (OUT,)).astype(dtype))  # (..., OUT)
    before = [host(a) for a in (x, W)]
    out, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(dout, cache)
    for a, a0 in zip((x, W), before):
        np.testing.assert_array_equal(host(a), a0)  # no writes into inputs
    assert out.shape == lead + (OUT,) and out.dtype == dtype
    assert dx.shape == x.shape and dW.shape == W.shape and dx.dtype == dW.dtype == dtype
    assert (db is None) == (not bias)

    ts = [torch.tensor(host(a), requires_grad=True) for a in (x, W)]  # float64
    b_t = torch.tensor(host(b), requires_grad=True) if bias else None
    out_t = torch.nn.functional.linear(*ts, b_t)
    out_t.backward(torch.tensor(host(dout)))
    np.testing.assert_allclose(host(out), out_t.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(host(dx), ts[0].grad.numpy(), **TOL[dtype])
    np.testing.assert_allclose(host(dW), ts[1].grad.numpy(), **TOL[dtype])
    if bias:
        assert db.shape == (OUT,) and db.dtype == dtype
        np.testing.assert_allclose(host(db), b_t.grad.numpy(), **TOL[dtype])


def test_known_values(xp):
    """W is in torch's (out, in) layout: y[o] = sum_i W[o, i] x[i] + b[o]."""
    x = xp.asarray([[1.0, 2.0]])  # (1, IN)
    W = xp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (OUT, IN)
    b = xp.asarray([0.5, 0.0, -3.0])  # (OUT,)
    out, cache = linear_forward(x, W, b)
    np.testing.assert_array_equal(to_host(out), [[1.5, 2.0, 0.0]])
    dx, dW, db = linear_backward(xp.asarray([[1.0, 10.0, 100.0]]), cache)
    np.testing.assert_array_equal(to_host(dx), [[101.0, 110.0]])
    np.testing.assert_array_equal(to_host(dW), [[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    np.testing.assert_array_equal(to_host(db), [1.0, 10.0, 100.0])


def test_bias_is_not_written(xp):
    b = xp.asarray([1.0, 2.0])
    linear_forward(xp.ones((3, 2)), xp.ones((2, 2)), b)
    np.testing.assert_array_equal(to_host(b), [1.0, 2.0])
