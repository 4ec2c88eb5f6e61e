"""Tests for nanograd/dropout.py: inverted dropout with a seeded mask."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.backend import make_rng, to_host
from nanograd.dropout import dropout_backward, dropout_forward

# Against torch's formula (x * mask / (1 - p)) fed our mask: float64 differs
# only by where 1/(1-p) is rounded, ~1e-16, so the rtol 1e-9; atol 0
# since dropped entries are exactly 0 on both sides.  float32: our 1/(1-p)
# and the product x * keep are each rounded to float32 (unit roundoff 6e-8)
# and the float64 oracle's are not, so rtol 1e-6.
TOL = {"float64": dict(rtol=1e-9, atol=0), "float32": dict(rtol=1e-6, atol=0)}

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
probabilities = st.sampled_from([0.0, 0.1, 0.5, 0.9]) | st.floats(0.0, 0.95)


@given(shape=shapes, p=probabilities, layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, shape, p, layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, rng.standard_normal(shape), layout)  # (...)

    def forward(x):  # a fresh generator with the same seed: the same mask on every call
        return dropout_forward(x, p, make_rng(xp, seed))
    gradcheck("dropout", forward, dropout_backward, [x], [0], ["x"], seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(shape=shapes, p=probabilities, layout=layouts, seed=seeds)
def test_matches_torch_with_our_mask(xp, host, relayout, dtype, shape, p, layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(xp, rng.standard_normal(shape).astype(dtype), layout)  # (...)
    dout = xp.asarray(rng.standard_normal(shape).astype(dtype))  # (...)
    x_before = host(x)
    out, cache = dropout_forward(x, p, make_rng(xp, seed))
    dx = dropout_backward(dout, cache)
    np.testing.assert_array_equal(host(x), x_before)  # no writes into inputs
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == shape

    if p == 0.0:
        assert cache.keep is None
        kept = torch.ones(shape, dtype=torch.bool)
    else:
        keep = to_host(cache.keep)
        assert keep.dtype == dtype
        assert np.isin(keep, [0, np.asarray(1 / (1 - p), dtype=dtype)]).all()
        kept = torch.tensor(keep != 0)
    x_t = torch.tensor(host(x), requires_grad=True)  # float64
    out_t = x_t * (kept.to(torch.float64) / (1 - p))  # torch's own dropout formula, our mask
    out_t.backward(torch.tensor(host(dout)))
    np.testing.assert_allclose(host(out), out_t.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(host(dx), x_t.grad.numpy(), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_statistics(xp, dtype, p):
    n = 200_000
    x = xp.asarray(np.random.default_rng(1).uniform(1.0, 2.0, size=(400, n // 400)).astype(dtype))
    out, cache = dropout_forward(x, p, make_rng(xp, 3))
    out, x, keep = to_host(out), to_host(x), to_host(cache.keep)
    kept = keep != 0
    # the kept count is Binomial(n, 1-p): within 5 standard deviations
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    # survivors are scaled by 1/(1-p), the rest are exactly 0
    scale = np.asarray(1 / (1 - p), dtype=dtype)
    np.testing.assert_array_equal(keep[kept], scale)
    np.testing.assert_array_equal(out[~kept], 0)
    rtol = 1e-15 if dtype == "float64" else 1e-6  # one rounding of x * scale
    np.testing.assert_allclose(out[kept], x[kept].astype(np.float64) / (1 - p), rtol=rtol)
    # so the expected value is unchanged: mean(keep) = 1 within 5 standard deviations
    assert abs(keep.astype(np.float64).mean() - 1) < 5 * np.sqrt(p / (1 - p) / n)


def test_same_seed_same_mask(xp):
    x = xp.ones((8, 16))
    a = to_host(dropout_forward(x, 0.5, make_rng(xp, 11))[1].keep)
    b = to_host(dropout_forward(x, 0.5, make_rng(xp, 11))[1].keep)
    c = to_host(dropout_forward(x, 0.5, make_rng(xp, 12))[1].keep)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generator_advances(xp):
    """Two calls with one generator draw two different masks."""
    x, rng = xp.ones((8, 16)), make_rng(xp, 11)
    a = to_host(dropout_forward(x, 0.5, rng)[1].keep)
    b = to_host(dropout_forward(x, 0.5, rng)[1].keep)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("p, train", [(0.5, False), (0.0, True), (0.0, False)])
def test_eval_mode_and_p0_are_identity(xp, p, train):
    x = xp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    out, cache = dropout_forward(x, p, make_rng(xp, 0), train=train)
    assert cache.keep is None
    np.testing.assert_array_equal(to_host(out), to_host(x))
    dout = xp.asarray(np.random.default_rng(1).standard_normal((3, 4)))
    np.testing.assert_array_equal(to_host(dropout_backward(dout, cache)), to_host(dout))


def test_eval_mode_needs_no_generator(xp):
    out, cache = dropout_forward(xp.ones(3), 0.5, None, train=False)
    assert cache.keep is None
