"""Tests for nanograd/fast/counter_rng.py: the hash generator make_rng hands to CuPy code."""
import types

import numpy as np
import pytest

from nanograd import backend
from nanograd.backend import make_rng, to_host
from nanograd.fast.counter_rng import GOLDEN, M1, M2, MASK, THREADS, CounterRNG, mix
from nanograd.dropout import dropout_forward


def splitmix_by_hand(key, draw, i):
    """Element i of draw `draw`, written out with Python ints (no arrays, no shifts by np.uint64)."""
    s = mix(key ^ mix(draw))
    z = (s + (i + 1) * GOLDEN) % 2**64
    z = ((z ^ (z >> 30)) * M1) % 2**64
    z = ((z ^ (z >> 27)) * M2) % 2**64
    return z ^ (z >> 31)


@pytest.mark.parametrize("dtype, bits", [("float32", 24), ("float64", 53)])
def test_numpy_draws_follow_the_formula(dtype, bits):
    rng = CounterRNG(np, 2**64 + 77)  # keys are taken modulo 2**64
    rng.random(5, dtype)  # draw 0
    got = rng.random((3, 4), dtype)  # draw 1
    assert got.shape == (3, 4) and got.dtype == dtype
    want = [(splitmix_by_hand(77, 1, i) >> (64 - bits)) * 2.0 ** -bits for i in range(12)]
    np.testing.assert_array_equal(got.reshape(-1), np.array(want, dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numbers_are_uniform_on_0_1(dtype):
    u = CounterRNG(np, 5).random(200_000, dtype)
    assert 0.0 <= u.min() and u.max() < 1.0
    # 50 equal bins: each count is ~ binomial(200000, 0.02), sd 63; chi-square with 49
    # degrees of freedom stays under 90 with probability 1 - 3e-4 (the draw is fixed, so
    # this either always passes or always fails; a broken mix fails by thousands).
    counts = np.bincount((u * 50).astype(int), minlength=50)
    chi2 = ((counts - 4000.0) ** 2 / 4000.0).sum()
    assert chi2 < 90, chi2
    # neighbours are uncorrelated (a sequence that only counts up would not be)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_same_key_same_draws_and_each_draw_is_new():
    a, b = CounterRNG(np, 9), CounterRNG(np, 9)
    first, second = a.random(1000), a.random(1000)
    np.testing.assert_array_equal(b.random(1000), first)
    np.testing.assert_array_equal(b.random(1000), second)
    assert a.draws == b.draws == 2
    assert (first != second).mean() > 0.99
    assert (CounterRNG(np, 10).random(1000) != first).mean() > 0.99


def test_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float32 or float64"):
        CounterRNG(np, 1).random(3, np.float16)


def fake_cupy():
    """A module that is not NumPy and whose cuRAND generators fail loudly if made."""
    def no_curand(*args, **kwargs):
        raise AssertionError("make_rng built a cuRAND generator")
    return types.SimpleNamespace(random=types.SimpleNamespace(default_rng=no_curand))


def test_make_rng_on_cupy_builds_no_curand_generator():
    """train.py calls make_rng every micro-step: on CuPy it must not initialise cuRAND states."""
    rng = make_rng(fake_cupy(), 1337, 1, 40, 0)
    assert isinstance(rng, CounterRNG) and rng.draws == 0
    # the key is the seeds' SeedSequence state, as for NumPy: (seed, stream, step, micro) all count
    again, later = make_rng(fake_cupy(), 1337, 1, 40, 0), make_rng(fake_cupy(), 1337, 1, 41, 0)
    assert again.key == rng.key != later.key
    assert rng.key == int(np.random.SeedSequence([1337, 1, 40, 0]).generate_state(1, np.uint64)[0])


def test_a_resumed_step_draws_what_the_uninterrupted_one_drew(xp):
    """The masks of step 40 from a generator made afresh (as a resumed run makes it) are the same."""
    x = xp.ones((4, 8, 16), dtype=xp.float32)  # (B, T, C)
    first = make_rng(xp, 1337, 1, 40, 0)
    masks = [to_host(dropout_forward(x, 0.1, first)[1].keep) for _ in range(3)]
    resumed = make_rng(xp, 1337, 1, 40, 0)
    for mask in masks:
        np.testing.assert_array_equal(to_host(dropout_forward(x, 0.1, resumed)[1].keep), mask)
    assert not np.array_equal(masks[0], masks[1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 5), (THREADS * 8192 + 3,)], ids=["empty", "one", "7x5", "grid-stride"])
def test_cupy_kernel_equals_numpy_bit_for_bit(cp, dtype, shape):
    """The CUDA kernel is the NumPy reference's arithmetic: every bit agrees, past one grid's worth too."""
    gpu, cpu = CounterRNG(cp, 31), CounterRNG(np, 31)
    for _ in range(2):
        got = gpu.random(shape, dtype)
        assert isinstance(got, cp.ndarray) and got.shape == shape and got.dtype == dtype
        np.testing.assert_array_equal(to_host(got), cpu.random(shape, dtype))


def test_make_rng_on_real_cupy_is_a_counter_rng(cp):
    assert isinstance(make_rng(cp, 1, 2), CounterRNG)
    assert backend.get_array_module(make_rng(cp, 1, 2).random((2, 3), np.float32)) is cp


def test_key_is_64_bits():
    assert CounterRNG(np, -1).key == MASK
