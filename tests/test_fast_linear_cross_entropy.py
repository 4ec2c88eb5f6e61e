"""Tests for nanograd/fast/linear_cross_entropy.py: the output layer and the loss, fused and chunked.

The reference is the textbook pair it replaces, linear_forward then
cross_entropy_forward (each proven against torch in its own tests), and
finite differences.  Chunks are made narrow (vchunk 1 to 8) so that a row of
a few dozen logits spans many chunks, both CPU threads, and a short last chunk.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import nanograd.fast.linear_cross_entropy as lce
from nanograd.backend import to_host
from nanograd.cross_entropy import cross_entropy_backward, cross_entropy_forward
from nanograd.linear import linear_backward, linear_forward
from nanograd.fast.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward

# float64: the same sums as the pair's in another order (per chunk, then across
# chunks after rescaling by exp(max_c - M)), ~1e-15 relative; rtol 1e-10 leaves
# room, atol 1e-13 for gradient entries that cancel to about 0.
# float32: each rounding is 6e-8 relative; sums over up to 40 logits or 7
# positions, and log-sum-exp turns a relative error in a logit of size ~10
# into an absolute one in the loss: rtol 1e-5, atol 1e-6.
TOL = {"float64": dict(rtol=1e-10, atol=1e-13), "float32": dict(rtol=1e-5, atol=1e-6)}


def make_inputs(xp, rng, N, C, V, dtype, scale=1.0):
    x = xp.asarray(rng.standard_normal((N, C)).astype(dtype))  # (N, C)
    W = xp.asarray((rng.standard_normal((V, C)) * scale).astype(dtype))  # (V, C)
    b = xp.asarray(rng.standard_normal(V).astype(dtype))  # (V,)
    targets = rng.integers(0, V, size=N)  # (N,)
    targets[-1] = targets[0]  # a repeated target, on purpose
    return x, W, b, xp.asarray(targets)


def fused(xp, x, W, b, targets, dloss, vchunk):
    work = xp.full((x.shape[0], W.shape[0]), np.nan, dtype=x.dtype)  # poisoned: every entry must be written
    loss, cache = linear_cross_entropy_forward(x, W, b, targets, work, vchunk)
    return (loss, *linear_cross_entropy_backward(dloss, cache))


def plain(x, W, b, targets, dloss):
    logits, linear_cache = linear_forward(x, W, b)  # (N, V)
    loss, ce_cache = cross_entropy_forward(logits, targets)
    return (loss, *linear_backward(cross_entropy_backward(dloss, ce_cache), linear_cache))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(N=st.integers(1, 7), C=st.integers(1, 5), V=st.integers(1, 40), vchunk=st.sampled_from([1, 3, 8, 4096]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), dloss=st.sampled_from([1.0, -0.5, 3.0]),
       seed=st.integers(0, 2**32 - 1))
def test_equals_the_plain_pair(xp, host, dtype, N, C, V, vchunk, scale, dloss, seed):
    x, W, b, targets = make_inputs(xp, np.random.default_rng(seed), N, C, V, dtype, scale)
    before = [host(a) for a in (x, W, b)]
    got = fused(xp, x, W, b, targets, dloss, vchunk)
    want = plain(x, W, b, targets, dloss)
    for a, a_before in zip((x, W, b), before):
        np.testing.assert_array_equal(host(a), a_before)  # no writes into inputs
    assert got[0].shape == () and got[0].dtype == dtype
    for name, g, w in zip(("loss", "dx", "dW", "db"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        np.testing.assert_allclose(host(g), host(w), **TOL[dtype], err_msg=name)


@given(V=st.integers(1, 13), vchunk=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**32 - 1))
def test_backward_matches_finite_differences(xp, gradcheck, V, vchunk, seed):
    rng = np.random.default_rng(seed)
    x, W, b, targets = make_inputs(xp, rng, 3, 2, V, "float64", scale=2.0)
    x = x.reshape(1, 3, 2)  # (B, T, C): leading dimensions are flattened

    def forward(x, W, b, targets):
        work = xp.empty((3, V))  # (N, V) fresh each call: the backward uses its work up
        return linear_cross_entropy_forward(x, W, b, targets, work, vchunk)

    gradcheck("linear_cross_entropy", forward, linear_cross_entropy_backward, [x, W, b, targets], [0, 1, 2], ["x", "W", "b"], seed)


def test_logits_far_apart_in_different_chunks(host):
    """A target 2000 below the top logit: shifted by the target's logit, exp overflows, so the
    forward is redone shifted by the row max; chunks 2000 below the top underflow to 0."""
    N, C, V = 2, 1, 6
    x = np.ones((N, C))  # (N, C) so logits = W[:, 0] + b
    W = np.array([[1000.0], [999.0], [-1000.0], [-1000.0], [0.0], [1.0]])  # (V, C) chunks of 2
    b = np.zeros(V)
    targets = np.array([2, 1])
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        loss, dx, dW, db = fused(np, x, W, b, targets, 1.0, vchunk=2)
    want = plain(x, W, b, targets, 1.0)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in (dx, dW, db))
    lse = 1000 + np.log(1 + np.exp(-1.0))
    np.testing.assert_allclose(loss, ((lse + 1000) + (lse - 999)) / 2, rtol=1e-15)
    for g, w in zip((loss, dx, dW, db), want):
        np.testing.assert_allclose(g, w, **TOL["float64"])


@pytest.mark.parametrize("gap, passes", [(80.0, 1), (100.0, 2)])
def test_shift_by_the_target_logit_unless_it_overflows(monkeypatch, gap, passes):
    """float32, a logit `gap` above its target's: within exp's range (e^80 = 5.5e34) one pass of
    products, shifted by the target's logit, is as exact as the plain pair; beyond it (e^100
    overflows) the forward runs again shifted by the row max.  Counted through parallel()."""
    x = np.ones((2, 1), np.float32)  # (N, C) so logits = W[:, 0] + b
    W = np.array([[gap / 2], [0.0], [-3.0], [gap / 2], [1.0]], np.float32)  # (V, C)
    b = np.array([gap / 2, 0.0, 0.0, gap / 2 - 0.5, -1.0], np.float32)  # logits: gap, 0, -3, gap - 0.5, 0
    targets = np.array([1, 4])
    calls = []
    monkeypatch.setattr(lce, "parallel", lambda tasks: calls.append(len(tasks)) or [f(*a) for f, *a in tasks])
    linear_cross_entropy_forward(x, W, b, targets, np.empty((2, 5), np.float32), vchunk=2)
    assert len(calls) == passes
    monkeypatch.undo()
    got = fused(np, x, W, b, targets, 1.0, vchunk=2)
    for name, g, w in zip(("loss", "dx", "dW", "db"), got, plain(x, W, b, targets, 1.0)):
        np.testing.assert_allclose(g, w, **TOL["float32"], err_msg=name)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_any_number_of_threads_gives_the_same_numbers(monkeypatch, threads):
    """Chunks are the same whichever thread takes them: loss, dW and db bit for bit;
    dx adds one partial sum per thread, so it agrees to rounding."""
    rng = np.random.default_rng(3)
    x, W, b, targets = make_inputs(np, rng, 5, 3, 29, "float64")
    reference = fused(np, x, W, b, targets, 1.0, vchunk=3)
    monkeypatch.setattr(lce, "cpu_threads", lambda: threads)
    got = fused(np, x, W, b, targets, 1.0, vchunk=3)
    for i in (0, 2, 3):
        np.testing.assert_array_equal(got[i], reference[i])
    np.testing.assert_allclose(got[1], reference[1], **TOL["float64"])


def test_work_and_dW_out_are_reused_and_repeatable():
    rng = np.random.default_rng(5)
    x, W, b, targets = make_inputs(np, rng, 4, 3, 17, "float64")
    work, dW_out = np.empty((4, 17)), np.empty((17, 3))
    results = []
    for _ in range(2):
        loss, cache = linear_cross_entropy_forward(x, W, b, targets, work, vchunk=4)
        assert cache.work is work
        dx, dW, db = linear_cross_entropy_backward(1.0, cache, dW_out=dW_out)
        assert dW is dW_out
        results.append((loss, dx.copy(), dW.copy(), db))
    for first, second in zip(*results):
        np.testing.assert_array_equal(first, second)


def test_book_sized_chunks(host):
    """VCHUNK columns a chunk, a vocabulary of 2.5 chunks, float32 as train.py runs it."""
    rng = np.random.default_rng(8)
    V = lce.VCHUNK * 5 // 2
    x, W, b, targets = make_inputs(np, rng, 16, 8, V, "float32", scale=0.3)
    got = fused(np, x, W, b, targets, 1.0, vchunk=None)
    want = plain(x, W, b, targets, 1.0)
    for name, g, w in zip(("loss", "dx", "dW", "db"), got, want):
        np.testing.assert_allclose(g, w, **TOL["float32"], err_msg=name)
    assert float(to_host(got[0])) > 0


@pytest.mark.parametrize("bad", [-1, 17])
def test_target_outside_the_vocabulary_is_refused(bad):
    """A target no chunk holds would leave its logit unset: refused, as the plain pair's indexing refuses it."""
    x, W, b, targets = make_inputs(np, np.random.default_rng(9), 4, 3, 17, "float64")
    targets[2] = bad
    with pytest.raises(IndexError, match="0..16"):
        linear_cross_entropy_forward(x, W, b, targets, np.empty((4, 17)), vchunk=4)
