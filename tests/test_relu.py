"""Tests for nanograd/relu.py: max(x, 0)."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.backend import to_host
from nanograd.relu import relu_backward, relu_forward

# ReLU only copies or zeroes values, so ours and torch's agree exactly in
# either precision; the tolerances are the rtol 1e-9 with no atol.
TOL = dict(rtol=1e-9, atol=0)

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def away_from_zero(rng, shape, margin=1e-3):
    """Normal values pushed at least `margin` away from the kink at 0, so that
    finite differences with h = 1e-6 never straddle it."""
    r = rng.standard_normal(shape)
    return np.where(r >= 0, 1.0, -1.0) * (margin + np.abs(r))


@given(shape=shapes, layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, shape, layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, away_from_zero(rng, shape), layout)  # (...)
    gradcheck("relu", relu_forward, relu_backward, [x], [0], ["x"], seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(shape=shapes, layout=layouts, seed=seeds)
def test_matches_torch(xp, host, relayout, dtype, shape, layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, away_from_zero(rng, shape).astype(dtype), layout)  # (...)
    dout = xp.asarray(rng.standard_normal(shape).astype(dtype))  # (...)
    x_before = host(x)
    out, cache = relu_forward(x)
    dx = relu_backward(dout, cache)
    np.testing.assert_array_equal(host(x), x_before)  # no writes into inputs
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == shape

    x_t = torch.tensor(host(x), requires_grad=True)  # float64
    out_t = torch.relu(x_t)
    out_t.backward(torch.tensor(host(dout)))
    np.testing.assert_allclose(host(out), out_t.detach().numpy(), **TOL)
    np.testing.assert_allclose(host(dx), x_t.grad.numpy(), **TOL)


def test_known_values_and_zero_gets_no_gradient(xp):
    """At exactly 0 the slope is taken as 0, as torch does."""
    x = xp.asarray([-2.0, -0.0, 0.0, 1e-300, 3.0])
    out, cache = relu_forward(x)
    np.testing.assert_array_equal(to_host(out), [0.0, 0.0, 0.0, 1e-300, 3.0])
    dx = relu_backward(xp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]), cache)
    np.testing.assert_array_equal(to_host(dx), [0.0, 0.0, 0.0, 4.0, 5.0])
    x_t = torch.tensor(to_host(x), requires_grad=True)
    torch.relu(x_t).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    np.testing.assert_array_equal(to_host(dx), x_t.grad.numpy())
