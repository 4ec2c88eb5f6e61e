"""Tests for nanograd/fast/batch_split.py: the walk with the batch cut over threads is the plain walk."""
import numpy as np
import pytest

from nanograd.backend import make_rng
from nanograd.block import PLAIN_KERNELS, BlockParams, blocks_backward, blocks_forward
from nanograd.fast import batch_split
from nanograd.fast.kernels import kernel_table

T, C, NH = 5, 8, 2


def stack(rng, n=2):
    hs = C // NH
    shapes = BlockParams(ln1_w=(C,), ln1_b=(C,), Wq=(NH, hs, C), Wk=(NH, hs, C), Wv=(NH, hs, C),
                         proj_W=(C, C), proj_b=(C,), ln2_w=(C,), ln2_b=(C,),
                         fc1_W=(4 * C, C), fc1_b=(4 * C,), fc2_W=(C, 4 * C), fc2_b=(C,))
    return [BlockParams(*(rng.standard_normal(s) * 0.4 for s in shapes)) for _ in range(n)]


@pytest.fixture
def threads(monkeypatch):
    """Pretend the machine has n threads (the pool itself keeps its real size)."""
    def set_threads(n):
        monkeypatch.setattr(batch_split, "cpu_threads", lambda: n)
    return set_threads


@pytest.mark.parametrize("B, n, shares", [(2, 2, 2), (7, 3, 3), (6, 4, 3)],
                         ids=["2-of-1", "7-over-3", "6-over-4"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_split_walk_equals_the_plain_walk(threads, B, n, shares, p):
    """Outputs and dx to the last bit per row; the weights' gradients to rounding (summed over shares);
    the dropout masks bit for bit, drawn from the same generator as the plain walk's."""
    threads(n)
    rng = np.random.default_rng(0)
    blocks = stack(rng)
    x, dout = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
    out, cache = batch_split.blocks_forward(x, blocks, p, make_rng(np, 3), True, kernel_table(np))
    assert isinstance(cache, batch_split.SplitBlocksCache) and len(cache.shares) == shares  # 6 over 4: 2 sequences a share
    want_out, want_caches = blocks_forward(x, blocks, p, make_rng(np, 3), True, PLAIN_KERNELS)
    np.testing.assert_allclose(out, want_out, rtol=1e-13, atol=1e-13)
    for (s, e), caches in zip(*cache):
        for got, want in zip(caches, want_caches):
            for kernel in ("attn", "drop1", "drop2"):
                got_keep, want_keep = getattr(got, kernel), getattr(want, kernel)
                got_keep = got_keep.dropout.keep if kernel == "attn" else got_keep.keep
                want_keep = want_keep.dropout.keep if kernel == "attn" else want_keep.keep
                if p == 0.0:
                    assert got_keep is None and want_keep is None
                else:
                    np.testing.assert_array_equal(got_keep, want_keep[s:e], err_msg=kernel)
    dx, grads = batch_split.blocks_backward(dout, cache)
    want_dx, want_grads = blocks_backward(dout, want_caches)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        assert isinstance(got, BlockParams)
        for name, g, w in zip(BlockParams._fields, got, want):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12, err_msg=name)


def test_fewer_sequences_than_threads_is_the_uncut_walk(threads):
    threads(4)
    rng = np.random.default_rng(1)
    blocks = stack(rng)
    x = rng.standard_normal((3, T, C))
    out, caches = batch_split.blocks_forward(x, blocks, 0.0, None, False, PLAIN_KERNELS)
    assert isinstance(caches, list)
    np.testing.assert_array_equal(out, blocks_forward(x, blocks, 0.0, None, False)[0])
    dx, _ = batch_split.blocks_backward(np.ones_like(out), caches)
    np.testing.assert_array_equal(dx, blocks_backward(np.ones_like(out), caches)[0])


def test_a_shares_draws_are_its_rows_of_the_whole_draws_whichever_share_asks_first():
    draws = batch_split.BatchDraws(np.random.default_rng(4), 5)
    late, early = draws.share(3, 5), draws.share(0, 3)
    second_late = [late.random((2, 3), np.float32), late.random((2, 4, 4), np.float64)]
    first = [early.random((3, 3), np.float32), early.random((3, 4, 4), np.float64)]
    whole_rng = np.random.default_rng(4)
    whole = [whole_rng.random((5, 3), dtype=np.float32), whole_rng.random((5, 4, 4), dtype=np.float64)]
    for w, a, b in zip(whole, first, second_late):
        np.testing.assert_array_equal(a, w[:3])
        np.testing.assert_array_equal(b, w[3:])
