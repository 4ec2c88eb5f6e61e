"""Tests for nanograd/embedding.py: the lookup and its scatter-add backward."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.backend import to_host
from nanograd.embedding import embedding_backward, embedding_forward

# float64 against torch: a lookup copies and the backward adds at most B*T
# rows, so the only differences are rounding in those few additions; the
# issue's rtol 1e-9, and atol 1e-12 for sums that cancel to about 0.
# float32 against torch float64 on the same (float32) values: each addition
# rounds to float32 (unit roundoff 6e-8) and up to 12 rows are added, so
# rtol 1e-5; atol 1e-6 for sums of O(1) terms that cancel to about 0.
TOL = {"float64": dict(rtol=1e-9, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])


def draw_ids(rng, B, T, V):
    """Token ids with at least one repeat whenever there are two positions."""
    idx = rng.integers(0, V, size=(B, T))  # (B, T)
    if B * T > 1:
        idx.flat[-1] = idx.flat[0]  # a repeated id, on purpose
    return idx


@given(B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(1, 5), C=st.integers(1, 4),
       W_layout=layouts, idx_layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, B, T, V, C,
                                             W_layout, idx_layout, seed):
    rng = np.random.default_rng(seed)
    idx = relayout(xp, draw_ids(rng, B, T, V), idx_layout)  # (B, T)
    W = relayout(xp, rng.standard_normal((V, C)), W_layout)  # (V, C)
    gradcheck("embedding", embedding_forward, embedding_backward, [idx, W], [1], ["W"], seed=seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(1, 6), C=st.integers(1, 5),
       layout=layouts, seed=seeds)
def test_matches_torch(xp, host, relayout, dtype, B, T, V, C, layout, seed):
    rng = np.random.default_rng(seed)
    idx = xp.asarray(draw_ids(rng, B, T, V))  # (B, T)
    W = relayout(xp, rng.standard_normal((V, C)).astype(dtype), layout)  # (V, C)
    dout = xp.asarray(rng.standard_normal((B, T, C)).astype(dtype))  # (B, T, C)
    W_before = host(W)
    out, cache = embedding_forward(idx, W)
    dW = embedding_backward(dout, cache)
    assert out.shape == (B, T, C) and out.dtype == dtype
    assert dW.shape == (V, C) and dW.dtype == dtype
    np.testing.assert_array_equal(host(W), W_before)  # no writes into inputs

    W_t = torch.tensor(host(W), requires_grad=True)  # float64
    out_t = torch.nn.functional.embedding(torch.tensor(to_host(idx)), W_t)
    out_t.backward(torch.tensor(host(dout)))
    np.testing.assert_allclose(host(out), out_t.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(host(dW), W_t.grad.numpy(), **TOL[dtype])


def test_repeated_ids_accumulate(xp):
    W = xp.zeros((4, 2))  # (V, C)
    idx = xp.asarray([[1, 1, 2], [1, 0, 2]])  # id 1 three times, 2 twice, 3 never
    dout = xp.asarray([[[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]],
                       [[1000.0, 2000.0], [3.0, 4.0], [5.0, 6.0]]])  # (B, T, C)
    _, cache = embedding_forward(idx, W)
    dW = embedding_backward(dout, cache)
    np.testing.assert_array_equal(to_host(dW), [[3.0, 4.0],
                                               [1011.0, 2022.0],
                                               [105.0, 206.0],
                                               [0.0, 0.0]])


def test_forward_picks_rows(xp):
    W = xp.asarray(np.arange(12.0).reshape(4, 3))  # (V, C)
    out, _ = embedding_forward(xp.asarray([[3, 0, 3]]), W)
    np.testing.assert_array_equal(to_host(out), [[[9, 10, 11], [0, 1, 2], [9, 10, 11]]])


def test_backward_is_repeatable(xp):
    """Backward is pure: a second call on the same cache gives the same gradient.

    On NumPy bit for bit (np.add.at adds in index order).  On CuPy to rounding:
    cupyx.scatter_add adds with atomics, which do not fix the order in which the
    rows of a repeated id are added, so the last bit may differ between calls;
    three float64 rows summed in another order differ by at most ~2 ulps of the
    largest partial sum, far inside rtol 1e-12 of the dout scale.
    """
    rng = np.random.default_rng(0)
    idx = xp.asarray(draw_ids(rng, 2, 3, 4))
    _, cache = embedding_forward(idx, xp.asarray(rng.standard_normal((4, 5))))
    dout = xp.asarray(rng.standard_normal((2, 3, 5)))
    first, second = to_host(embedding_backward(dout, cache)), to_host(embedding_backward(dout, cache))
    if xp is np:
        np.testing.assert_array_equal(first, second)
    else:
        np.testing.assert_allclose(first, second, rtol=0, atol=1e-12 * np.abs(to_host(dout)).sum(axis=(0, 1)).max())
