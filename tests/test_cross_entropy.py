"""Tests for nanograd/cross_entropy.py: the fused, max-shifted softmax cross-entropy."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.backend import get_array_module, to_host
from nanograd.cross_entropy import cross_entropy_backward, cross_entropy_forward
from nanograd.fast.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward

# float64 against torch: a log-sum-exp and a mean over at most a few dozen
# terms, rounded in another order, ~1e-16 relative; the rtol 1e-9.
# atol 1e-12: a loss or a gradient entry (p - onehot) / N that cancels to
# about 0 has no meaningful relative error.
# float32 against torch float64 on the same float32 values: exp, the sums and
# the log each round to float32 (6e-8), and log-sum-exp turns a relative error
# in a large logit into an absolute one in the loss, so rtol 1e-5 and atol
# 1e-6 (for probabilities and losses near 0).
TOL = {"float64": dict(rtol=1e-9, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])


def draw_targets(rng, N, V):
    """Target ids with a repeat whenever there are two rows."""
    targets = rng.integers(0, V, size=N)  # (N,)
    if N > 1:
        targets[-1] = targets[0]  # a repeated target, on purpose
    return targets


def fused_forward(logits, targets):
    """The loss half of nanograd/linear_cross_entropy.py alone: an output layer that
    copies its input (W = I, b = 0) turns the fused kernel into a cross-entropy of
    logits.  Chunks of 2 columns, so rows span several chunks and both CPU threads."""
    xp = get_array_module(logits)
    N, V = logits.shape
    identity, zeros = xp.eye(V, dtype=logits.dtype), xp.zeros(V, dtype=logits.dtype)  # (V, V), (V,)
    return linear_cross_entropy_forward(logits, identity, zeros, targets,
                                        xp.empty((N, V), dtype=logits.dtype), vchunk=2)


def fused_backward(dloss, cache):
    return linear_cross_entropy_backward(dloss, cache)[0]  # dx = dlogits @ I = dlogits


# the textbook kernels, and the fused output layer and loss the model trains with
PATHS = {"plain": (cross_entropy_forward, cross_entropy_backward),
         "fused": (fused_forward, fused_backward)}


def torch_cross_entropy(logits, targets, dloss):
    logits_t = torch.tensor(np.asarray(to_host(logits), dtype=np.float64), requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.tensor(to_host(targets)))
    loss_t.backward(torch.tensor(float(dloss), dtype=torch.float64))
    return loss_t.item(), logits_t.grad.numpy()


@pytest.mark.parametrize("path", PATHS)
@given(N=st.integers(1, 6), V=st.integers(1, 6), scale=st.sampled_from([0.1, 1.0, 5.0]),
       layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, path, N, V, scale, layout, seed):
    rng = np.random.default_rng(seed)
    logits = relayout(xp, rng.standard_normal((N, V)) * scale, layout)  # (N, V)
    targets = xp.asarray(draw_targets(rng, N, V))  # (N,)
    gradcheck("cross_entropy", *PATHS[path], [logits, targets], [0], ["logits"], seed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(N=st.integers(1, 9), V=st.integers(1, 10), scale=st.sampled_from([0.1, 1.0, 10.0]),
       dloss=st.sampled_from([1.0, -0.5, 3.0]), layout=layouts, seed=seeds)
def test_matches_torch(xp, host, relayout, path, dtype, N, V, scale, dloss, layout, seed):
    forward, backward = PATHS[path]
    rng = np.random.default_rng(seed)
    logits = relayout(xp, (rng.standard_normal((N, V)) * scale).astype(dtype), layout)  # (N, V)
    targets = xp.asarray(draw_targets(rng, N, V))  # (N,)
    logits_before = host(logits)
    loss, cache = forward(logits, targets)
    dlogits = backward(dloss, cache)
    np.testing.assert_array_equal(host(logits), logits_before)  # no writes into inputs
    assert loss.shape == () and loss.dtype == dtype
    assert dlogits.shape == (N, V) and dlogits.dtype == dtype

    loss_t, dlogits_t = torch_cross_entropy(logits, targets, dloss)
    np.testing.assert_allclose(float(loss), loss_t, **TOL[dtype])
    np.testing.assert_allclose(host(dlogits), dlogits_t, **TOL[dtype])
    # softmax rows sum to 1 and the one-hot row to 1: each gradient row sums to 0
    np.testing.assert_allclose(host(dlogits).sum(axis=-1), 0, atol=TOL[dtype]["atol"] * V)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_large_logits_do_not_overflow(xp, host, path, dtype):
    """exp(1000) overflows even float64; the row max is subtracted first."""
    logits = xp.asarray(np.array([[1000.0, -1000.0, 0.0],
                                  [-1000.0, -1000.0, -999.0],
                                  [1000.0, 1000.0, 1000.0],
                                  [-1000.0, 1000.0, 999.0]], dtype=dtype))  # (N, V)
    targets = xp.asarray([1, 2, 0, 2])  # (N,)
    # NumPy raises on an overflow, a nan or a log(0); exp(-2000) underflowing to 0 is fine
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        loss, cache = PATHS[path][0](logits, targets)
        dlogits = PATHS[path][1](1.0, cache)
    assert np.isfinite(float(loss)) and np.isfinite(to_host(dlogits)).all()
    loss_t, dlogits_t = torch_cross_entropy(logits, targets, 1.0)
    np.testing.assert_allclose(float(loss), loss_t, **TOL[dtype])
    np.testing.assert_allclose(host(dlogits), dlogits_t, **TOL[dtype])
    # by hand: row 0 loses 2000, row 1 log(1 + 2e^-1) ... each row is logsumexp - logit
    rows = np.array([2000.0, np.log(1 + 2 * np.exp(-1.0)), np.log(3.0), 1 + np.log(1 + np.exp(-1.0))])
    np.testing.assert_allclose(float(loss), rows.mean(), **TOL[dtype])


def test_known_value_and_gradient(xp):
    """Uniform logits: loss = log V and dlogits = (1/V - onehot) / N."""
    N, V = 2, 4
    loss, cache = cross_entropy_forward(xp.zeros((N, V)), xp.asarray([3, 3]))
    np.testing.assert_allclose(float(loss), np.log(V), rtol=1e-15)
    dlogits = to_host(cross_entropy_backward(1.0, cache))
    expected = np.full((N, V), 1 / V)
    expected[:, 3] -= 1
    np.testing.assert_allclose(dlogits, expected / N, rtol=1e-15)


def test_backward_scales_with_dloss_and_is_repeatable(xp):
    rng = np.random.default_rng(0)
    _, cache = cross_entropy_forward(xp.asarray(rng.standard_normal((3, 5))), xp.asarray([0, 4, 0]))
    probs_before = to_host(cache.probs).copy()
    g1 = to_host(cross_entropy_backward(1.0, cache))
    g2 = to_host(cross_entropy_backward(xp.asarray(2.5), cache))  # a 0-d array, as from a chain
    np.testing.assert_array_equal(to_host(cache.probs), probs_before)  # the cache is not written
    np.testing.assert_allclose(g2, 2.5 * g1, rtol=1e-15)
