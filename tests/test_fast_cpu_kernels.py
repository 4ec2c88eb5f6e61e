"""Tests for nanograd/fast/cpu_kernels.py: each kernel equals its plain twin.

float64, a random upstream gradient; the shapes are drawn so that the rows
(and the batch) split unevenly over the threads, a share can be a single
row, and with more threads than rows some threads get none.
"""
import contextlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from nanograd import attention, layernorm, linear, relu
from nanograd.backend import make_rng
from nanograd.fast import cpu_kernels, threads

# float64; the threaded kernels sum dW, dw, db in another order (partials per
# thread, or one product over every row), ~1e-16 relative per sum.
RTOL, ATOL = 1e-12, 1e-13


@contextlib.contextmanager
def cores(n):
    """Run as if the machine had n cores (the kernels cut their rows by cpu_threads())."""
    real = cpu_kernels.cpu_threads, cpu_kernels.MIN_FLOPS, cpu_kernels.MIN_ELEMENTS
    cpu_kernels.cpu_threads = lambda: n
    cpu_kernels.MIN_FLOPS = cpu_kernels.MIN_ELEMENTS = 1  # cut even the tests' tiny arrays
    try:
        yield
    finally:
        cpu_kernels.cpu_threads, cpu_kernels.MIN_FLOPS, cpu_kernels.MIN_ELEMENTS = real


thread_counts = st.integers(1, 3)


def assert_all_close(fast, plain, what):
    assert len(fast) == len(plain), what
    for i, (f, p) in enumerate(zip(fast, plain)):
        if p is None:
            assert f is None, f"{what}[{i}]"
            continue
        assert f.shape == p.shape, f"{what}[{i}]"
        np.testing.assert_allclose(f, p, rtol=RTOL, atol=ATOL, err_msg=f"{what}[{i}]")


shapes = st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 12), st.integers(0, 2**31 - 1))


@given(thread_counts, shapes, st.booleans())
def test_linear_equals_plain(n, shape, bias):
    B, T, IN, seed = shape
    rng = np.random.default_rng(seed)
    OUT = 1 + seed % 11
    x, W = rng.standard_normal((B, T, IN)), rng.standard_normal((OUT, IN))
    b = rng.standard_normal(OUT) if bias else None
    dout = rng.standard_normal((B, T, OUT))
    with cores(n):
        fast_out, fast_cache = cpu_kernels.linear_forward(x, W, b)
        fast_grads = cpu_kernels.linear_backward(dout, fast_cache)
    plain_out, plain_cache = linear.linear_forward(x, W, b)
    np.testing.assert_allclose(fast_out, plain_out, rtol=RTOL, atol=ATOL)
    assert_all_close(fast_grads, linear.linear_backward(dout, plain_cache), "linear_backward")


@given(thread_counts, shapes)
def test_relu_equals_plain(n, shape):
    B, T, D, seed = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))
    x[np.abs(x) < 1e-3] = 0.5  # away from the kink
    dout = rng.standard_normal((B, T, D))
    with cores(n):
        fast_out, fast_cache = cpu_kernels.relu_forward(x)
        fast_dx = cpu_kernels.relu_backward(dout, fast_cache)
    plain_out, plain_cache = relu.relu_forward(x)
    np.testing.assert_array_equal(fast_out, plain_out)
    np.testing.assert_array_equal(fast_dx, relu.relu_backward(dout, plain_cache))


@given(thread_counts, shapes)
def test_layernorm_equals_plain(n, shape):
    B, T, C, seed = shape
    C += 1  # a single feature normalises to 0 with rstd 1/sqrt(eps): allowed, but say 2+
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)) * 3 + 1
    w, b, dout = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal((B, T, C))
    with cores(n):
        fast_out, fast_cache = cpu_kernels.layernorm_forward(x, w, b)
        fast_grads = cpu_kernels.layernorm_backward(dout, fast_cache)
    plain_out, plain_cache = layernorm.layernorm_forward(x, w, b)
    np.testing.assert_allclose(fast_out, plain_out, rtol=RTOL, atol=ATOL)
    assert_all_close(fast_cache[2:], plain_cache[2:], "mean, rstd")
    assert_all_close(fast_grads, layernorm.layernorm_backward(dout, plain_cache), "layernorm_backward")


@given(thread_counts, st.integers(1, 5), st.integers(1, 9), st.sampled_from([(1, 3), (2, 2), (3, 4)]),
       st.sampled_from([0.0, 0.3]), st.integers(0, 2**31 - 1))
def test_attention_equals_plain(n, B, T, heads, p, seed):
    """Forward, cache and every gradient, dropout on and off: both draw the same mask from the generator."""
    NH, hs = heads
    C = 5
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C))
    Wq, Wk, Wv = (rng.standard_normal((NH, hs, C)) for _ in range(3))
    dout = rng.standard_normal((B, T, NH * hs))
    with cores(n):
        fast_out, fast_cache = cpu_kernels.attention_forward(x, Wq, Wk, Wv, p, make_rng(np, seed, 1), True)
        fast_grads = cpu_kernels.attention_backward(dout, fast_cache)
    plain_out, plain_cache = attention.attention_forward(x, Wq, Wk, Wv, p, make_rng(np, seed, 1), True)
    np.testing.assert_allclose(fast_out, plain_out, rtol=RTOL, atol=ATOL)
    assert_all_close(fast_cache[4:8], plain_cache[4:8], "q, k, v, att")
    if p:
        np.testing.assert_array_equal(fast_cache.dropout.keep, plain_cache.dropout.keep)
    assert_all_close(fast_grads, attention.attention_backward(dout, plain_cache), "attention_backward")


def test_attention_in_eval_mode_draws_no_mask():
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 3, 6))
    generator = make_rng(np, 0, 1)
    before = generator.random()
    generator = make_rng(np, 0, 1)
    out, cache = cpu_kernels.attention_forward(x, W, W, W, 0.5, generator, train=False)
    assert cache.dropout.keep is None
    assert generator.random() == before  # nothing drawn
    np.testing.assert_allclose(out, attention.attention_forward(x, W, W, W, 0.5, None, train=False)[0],
                               rtol=RTOL, atol=ATOL)


def test_float32_in_float32_out():
    """The model trains in float32: no kernel may promote to float64 on the way."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    W = rng.standard_normal((2, 3, 6)).astype(np.float32)
    Wl, bl, w = (rng.standard_normal(s).astype(np.float32) for s in ((6, 6), (6,), (6,)))
    out, cache = cpu_kernels.attention_forward(x, W, W, W)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in cpu_kernels.attention_backward(x, cache))
    out, cache = cpu_kernels.layernorm_forward(x, w, bl)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in cpu_kernels.layernorm_backward(x, cache))
    out, cache = cpu_kernels.linear_forward(x, Wl, bl)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in cpu_kernels.linear_backward(x, cache))


def test_the_threads_really_split_the_rows(monkeypatch):
    """With 2 threads the pool gets a share of its own (a kernel that ran everything on
    the calling thread would pass the equality tests above)."""
    monkeypatch.setattr(cpu_kernels, "cpu_threads", lambda: 2)
    monkeypatch.setattr(cpu_kernels, "MIN_FLOPS", 1)
    submitted = []
    real_submit = threads.submit
    monkeypatch.setattr(cpu_kernels, "submit", lambda tasks: submitted.append(len(tasks)) or real_submit(tasks))
    x = np.ones((4, 3, 5))
    cpu_kernels.linear_forward(x, np.ones((2, 5)))
    assert submitted == [1]


def test_small_work_stays_on_the_calling_thread(monkeypatch):
    """Under MIN_FLOPS a share, no task is handed to the pool (it would cost more than it saves)."""
    monkeypatch.setattr(cpu_kernels, "cpu_threads", lambda: 2)
    submitted = []
    real_submit = threads.submit
    monkeypatch.setattr(cpu_kernels, "submit", lambda tasks: submitted.append(len(tasks)) or real_submit(tasks))
    cpu_kernels.linear_forward(np.ones((4, 3, 5)), np.ones((2, 5)))
    assert submitted == [0]


@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 9), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**31 - 1))
def test_scatter_add_rows_is_add_at_to_the_last_bit(N, V, C, dtype, seed):
    """The same additions in the same order: repeated ids, float32 included, give identical bits."""
    rng = np.random.default_rng(seed)
    idx, rows = rng.integers(0, V, N), rng.standard_normal((N, C)).astype(dtype)
    start = rng.standard_normal((V, C)).astype(dtype)
    fast, plain = start.copy(), start.copy()
    cpu_kernels.scatter_add_rows(fast, idx, rows)
    np.add.at(plain, idx, rows)
    assert fast.tobytes() == plain.tobytes()


def test_scatter_add_rows_into_a_strided_array_still_adds():
    out = np.zeros((4, 6))[:, ::2]  # (4, 3), not contiguous: no flat view of it exists
    cpu_kernels.scatter_add_rows(out, np.array([1, 1, 3]), np.ones((3, 3)))
    np.testing.assert_array_equal(out, [[0, 0, 0], [2, 2, 2], [0, 0, 0], [1, 1, 1]])


def test_threads_given_keeps_a_kernel_to_that_many_shares(monkeypatch):
    """batch_split's shares call the kernels with threads=1: one share, on the calling thread."""
    seen = []
    real = cpu_kernels.parallel
    monkeypatch.setattr(cpu_kernels, "parallel", lambda tasks: seen.append(len(tasks)) or real(tasks))
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((2, 6, 4)), rng.standard_normal((5, 4))
    with cores(3):
        _, cache = cpu_kernels.linear_forward(x, W, None, threads=1)
        cpu_kernels.linear_backward(np.ones((2, 6, 5)), cache, threads=1)
        cpu_kernels.layernorm_forward(x, np.ones(4), np.zeros(4), threads=1)
        cpu_kernels.linear_forward(x, W, None)
    assert seen == [1, 1, 1, 3]
