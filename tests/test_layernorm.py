"""Tests for nanograd/layernorm.py: normalisation over the last axis, as torch.nn.LayerNorm."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.backend import to_host
from nanograd.layernorm import EPS, layernorm_backward, layernorm_forward

# float64 against torch: mean, variance and the sums in dw, db, dx are taken
# over at most a few dozen terms in a different order, ~1e-16 relative to the
# terms; the rtol 1e-9.  atol 1e-12: outputs and gradients that
# cancel to about 0 (xhat * w + b, sums of dout * xhat) have no meaningful
# relative error, and an ulp of x - mean times rstd <= 1/sqrt(eps) = 316 is
# ~1e-13.
# float32 against torch float64 on the same float32 values: each step rounds
# to float32 (6e-8) and the row statistics sum up to a few dozen of them, so
# rtol 1e-5, atol 1e-5 for values that cancel to about 0.  dx is a difference
# of terms of size rstd * |dout * w| that cancel, so its float32 error grows
# with rstd: the float32 comparison uses rows with a standard deviation of
# 0.5 to 2 (rstd <= 2); small-variance rows are checked in float64, where
# the same cancellation costs nothing visible at rtol 1e-9.
TOL = {"float64": dict(rtol=1e-9, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-5)}

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])
leading_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def well_spread_rows(rng, shape):
    """Normal rows rescaled to a standard deviation between 0.5 and 2 (any mean);
    a row of one element is constant."""
    x = rng.standard_normal(shape)  # (..., C)
    x -= x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)  # (..., 1)
    x = np.divide(x, std, out=np.zeros_like(x), where=std > 0)  # (..., C) unit spread
    return x * rng.uniform(0.5, 2.0, std.shape) + rng.uniform(-3, 3, std.shape)


def torch_layernorm(x, w, b, eps=EPS):
    """Output and (dx, dw, db) from torch autograd, float64, for upstream gradient dout."""
    def run(dout):
        ts = [torch.tensor(np.asarray(to_host(a), dtype=np.float64), requires_grad=True) for a in (x, w, b)]
        out = torch.nn.functional.layer_norm(ts[0], (ts[0].shape[-1],), ts[1], ts[2], eps=eps)
        out.backward(torch.tensor(np.asarray(to_host(dout), dtype=np.float64)))
        return out.detach().numpy(), [t.grad.numpy() for t in ts]
    return run


def assert_matches_torch(xp, host, x, w, b, dout, tol, eps=EPS):
    before = [host(a) for a in (x, w, b)]
    out, cache = layernorm_forward(x, w, b, eps)
    grads = layernorm_backward(dout, cache)
    for a, a0 in zip((x, w, b), before):
        np.testing.assert_array_equal(host(a), a0)  # no writes into inputs
    out_t, grads_t = torch_layernorm(x, w, b, eps)(dout)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(host(out), out_t, **tol)
    for name, g, g_t, a in zip(("dx", "dw", "db"), grads, grads_t, (x, w, b)):
        assert g.shape == a.shape and g.dtype == a.dtype, name
        np.testing.assert_allclose(host(g), g_t, **tol, err_msg=name)


@given(lead=leading_shapes, C=st.integers(1, 5), x_layout=layouts, w_layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, lead, C, x_layout, w_layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, rng.standard_normal(lead + (C,)), x_layout)  # (..., C)
    w = relayout(xp, 1 + rng.standard_normal(C), w_layout)  # (C,)
    b = xp.asarray(rng.standard_normal(C))  # (C,)
    gradcheck("layernorm", layernorm_forward, layernorm_backward, [x, w, b], [0, 1, 2],
              ["x", "w", "b"], seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(lead=leading_shapes, C=st.integers(1, 8), layout=layouts, seed=seeds)
def test_matches_torch(xp, host, relayout, dtype, lead, C, layout, seed):
    rng = np.random.default_rng(seed)
    if dtype == "float64":
        x = rng.standard_normal(lead + (C,)) * 2 + 1  # (..., C) any spread, some rows nearly constant
    else:
        x = well_spread_rows(rng, lead + (C,))  # (..., C) see TOL
    x = relayout(xp, x.astype(dtype), layout)  # (..., C)
    w = relayout(xp, (1 + rng.standard_normal(C)).astype(dtype), layout)  # (C,)
    b = xp.asarray(rng.standard_normal(C).astype(dtype))  # (C,)
    dout = xp.asarray(rng.standard_normal(lead + (C,)).astype(dtype))  # (..., C)
    assert_matches_torch(xp, host, x, w, b, dout, TOL[dtype])


def test_variance_is_biased(xp):
    """var = mean((x - mean)^2), dividing by C like torch, not by C - 1."""
    x = xp.asarray([[1.0, 2.0, 3.0, 4.0]])  # (1, C) mean 2.5, biased var 1.25, unbiased 5/3
    out, cache = layernorm_forward(x, xp.ones(4), xp.zeros(4))
    np.testing.assert_allclose(to_host(cache.mean), [[2.5]], rtol=1e-15)
    np.testing.assert_allclose(to_host(cache.rstd), [[1 / np.sqrt(1.25 + EPS)]], rtol=1e-14)
    expected = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.sqrt(1.25 + EPS)
    np.testing.assert_allclose(to_host(out)[0], expected, rtol=1e-14)
    unbiased = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.sqrt(5 / 3 + EPS)
    assert np.abs(to_host(out)[0] - unbiased).max() > 0.1


@pytest.mark.parametrize("spread", [0.0, 1e-6, 1e-4, 1e-3, 1e-2])
def test_eps_inside_sqrt_on_tiny_variance_rows(xp, host, spread):
    """rstd = 1/sqrt(var + eps).  With var well below eps = 1e-5 this differs
    from 1/(sqrt(var) + eps) by a factor of up to 300, so a misplaced eps fails."""
    rng = np.random.default_rng(5)
    C = 6
    x = xp.asarray(1.5 + spread * rng.standard_normal((3, C)))  # (3, C) tiny variance
    w, b = xp.asarray(1 + rng.standard_normal(C)), xp.asarray(rng.standard_normal(C))
    dout = xp.asarray(rng.standard_normal((3, C)))
    _, cache = layernorm_forward(x, w, b)
    x_h = to_host(x)
    var = x_h.var(axis=-1, keepdims=True)  # numpy's var is biased (ddof=0)
    np.testing.assert_allclose(to_host(cache.rstd), 1 / np.sqrt(var + EPS), rtol=1e-12)
    assert_matches_torch(xp, host, x, w, b, dout, TOL["float64"])


def test_constant_row(xp, host):
    """A constant row has var = 0 and xhat = 0: out = b, rstd = 1/sqrt(eps), no division
    by zero, and dx = rstd * (dxhat - mean(dxhat)) (the rstd path vanishes with xhat)."""
    x = xp.full((2, 5), 3.0)  # (2, C)
    w, b = xp.asarray(np.arange(1.0, 6.0)), xp.asarray(np.arange(5.0))
    out, cache = layernorm_forward(x, w, b)
    np.testing.assert_array_equal(to_host(out), np.tile(np.arange(5.0), (2, 1)))
    np.testing.assert_allclose(to_host(cache.rstd), 1 / np.sqrt(EPS), rtol=1e-15)
    dx, dw, db = layernorm_backward(xp.ones((2, 5)), cache)
    expected_dx = (np.arange(1.0, 6.0) - 3.0) / np.sqrt(EPS)  # dxhat = w, mean(w) = 3
    np.testing.assert_allclose(to_host(dx), np.tile(expected_dx, (2, 1)), rtol=1e-14)
    np.testing.assert_array_equal(to_host(dw), 0)
    np.testing.assert_array_equal(to_host(db), 2)
    assert_matches_torch(xp, host, x, w, b, xp.ones((2, 5)), TOL["float64"])


def test_eps_argument_is_used(xp, host):
    rng = np.random.default_rng(2)
    x = xp.asarray(rng.standard_normal((2, 3, 4)) * 1e-2)  # var ~ 1e-4, comparable to eps
    w, b = xp.asarray(rng.standard_normal(4)), xp.asarray(rng.standard_normal(4))
    dout = xp.asarray(rng.standard_normal((2, 3, 4)))
    assert_matches_torch(xp, host, x, w, b, dout, TOL["float64"], eps=1e-3)
    out_default, _ = layernorm_forward(x, w, b)
    out_big, _ = layernorm_forward(x, w, b, 1e-3)
    assert not np.allclose(to_host(out_default), to_host(out_big))


def test_parameter_gradients_sum_over_every_leading_axis(xp):
    """dw and db reduce over B and T, not over B alone."""
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((2, 3, 4)))  # (B, T, C)
    dout = xp.asarray(rng.standard_normal((2, 3, 4)))  # (B, T, C)
    out, cache = layernorm_forward(x, xp.ones(4), xp.zeros(4))  # out = xhat
    _, dw, db = layernorm_backward(dout, cache)
    np.testing.assert_allclose(to_host(db), to_host(dout).sum(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(to_host(dw), (to_host(dout) * to_host(out)).sum(axis=(0, 1)), rtol=1e-12)
