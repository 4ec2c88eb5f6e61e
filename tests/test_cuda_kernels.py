"""Tests for nanograd/fast/cuda_kernels.py: every fused CUDA kernel equals the plain kernel it replaces.

Each GPU test runs the plain kernel (nanograd/*.py on CuPy arrays) and its
CUDA twin on the same arrays and compares outputs, caches and gradients.
Without a CUDA device those tests are skipped with CuPy's reason; the tests
at the end, that the NumPy and reference paths never reach the CUDA code, run everywhere.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

from nanograd import backend
from nanograd.adamw import AdamW, adamw_update
from nanograd.fast.adamw import FastAdamW
from nanograd.attention import (attention_backward, attention_forward, causal_softmax_backward,
                                causal_softmax_forward)
from nanograd.backend import to_host
from nanograd.cross_entropy import cross_entropy_backward, cross_entropy_forward
from nanograd.layernorm import layernorm_backward, layernorm_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fused against plain on the same device and dtype: the same formulas, with
# the sums (row means, softmax denominators, column sums) taken in another
# order, and multiply-adds possibly fused into one rounding.  Each element then
# differs by a few roundings of the terms it is made of, so rtol is a few
# hundred ulps (float32 6e-8, float64 1e-16); atol, a fraction of the tensor's
# largest entry, covers entries that cancel to about 0 (dx of LayerNorm,
# dlogits where p ~ 1/V).  A wrong kernel is off by O(1).
TOL = {"float32": dict(rtol=1e-5, atol_scale=1e-6), "float64": dict(rtol=1e-12, atol_scale=1e-13)}
DTYPES = ["float32", "float64"]

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])


@pytest.fixture(scope="module")
def ck(cp):
    from nanograd.fast import cuda_kernels
    return cuda_kernels


def assert_close(fast, plain, dtype, name, scale=None):
    """|fast - plain| <= rtol |plain| + atol_scale * scale, elementwise, NaN nowhere.

    scale is max|plain| unless given: a statistic such as a row's mean is a sum of
    terms of the inputs' size and is rounded at that size, however near 0 it ends
    up, so its tolerance scales with the inputs (with a single row, max|mean| is
    that one mean, and near 0 would leave no tolerance at all).
    """
    fast, plain = to_host(fast), to_host(plain)
    assert fast.shape == plain.shape and fast.dtype == plain.dtype == np.dtype(dtype), \
        (name, fast.shape, plain.shape, fast.dtype, plain.dtype)
    assert np.isfinite(fast).all() and np.isfinite(plain).all(), name
    tol = TOL[dtype]
    err = np.abs(fast.astype(np.float64) - plain)
    if scale is None:
        scale = np.abs(plain).max(initial=0.0)
    bound = tol["rtol"] * np.abs(plain) + tol["atol_scale"] * scale
    if not (err <= bound).all():
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        pytest.fail(f"{name}: fused differs from plain by up to {err.max():.3e} "
                    f"(worst at {worst}: fused {fast[worst]!r}, plain {plain[worst]!r})")


# ---- LayerNorm --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=st.lists(st.integers(1, 7), min_size=0, max_size=2).map(tuple),
       C=st.sampled_from([1, 2, 5, 31, 33, 80, 257, 512, 1000]), layout=layouts, seed=seeds)
def test_layernorm_matches_plain(ck, cp, relayout, dtype, lead, C, layout, seed):
    rng = np.random.default_rng(seed)
    x = relayout(cp, (rng.standard_normal(lead + (C,)) * 2 + 0.5).astype(dtype), layout)  # (..., C)
    w = relayout(cp, (1 + rng.standard_normal(C)).astype(dtype), layout)  # (C,)
    b = cp.asarray(rng.standard_normal(C).astype(dtype))  # (C,)
    dout = cp.asarray(rng.standard_normal(lead + (C,)).astype(dtype))  # (..., C)
    out, cache = layernorm_forward(x, w, b)
    grads = layernorm_backward(dout, cache)
    out_f, cache_f = ck.layernorm_forward(x, w, b, 1e-5)
    grads_f = ck.layernorm_backward(dout, cache_f)
    assert cache_f.x is x and cache_f.w is w  # the same cache, holding the inputs themselves
    assert_close(out_f, out, dtype, "out")
    assert_close(cache_f.mean, cache.mean, dtype, "mean", scale=float(np.abs(to_host(x)).max(initial=0.0)))
    assert_close(cache_f.rstd, cache.rstd, dtype, "rstd")
    for name, g_f, g in zip(("dx", "dw", "db"), grads_f, grads):
        assert_close(g_f, g, dtype, name)
    # either backward takes either forward's cache
    for name, g_f, g in zip(("dx", "dw", "db"), ck.layernorm_backward(dout, cache), grads):
        assert_close(g_f, g, dtype, name + " from the plain cache")


def test_layernorm_many_rows_sum_over_every_chunk(ck, cp):
    """5000 rows: the column sums for dw and db run in many chunks of rows."""
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((5, 1000, 48)))  # (B, T, C)
    w, b = cp.asarray(1 + rng.standard_normal(48)), cp.asarray(rng.standard_normal(48))
    dout = cp.asarray(rng.standard_normal((5, 1000, 48)))
    grads = layernorm_backward(dout, layernorm_forward(x, w, b)[1])
    grads_f = ck.layernorm_backward(dout, ck.layernorm_forward(x, w, b, 1e-5)[1])
    for name, g_f, g in zip(("dx", "dw", "db"), grads_f, grads):
        assert_close(g_f, g, "float64", name)


# ---- causal softmax (attention) ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
       T=st.sampled_from([1, 2, 3, 31, 32, 33, 64, 65, 128]), scale=st.sampled_from([0.1, 1.0, 30.0]),
       layout=layouts, seed=seeds)
def test_causal_softmax_matches_plain(ck, cp, relayout, dtype, lead, T, scale, layout, seed):
    rng = np.random.default_rng(seed)
    preatt = relayout(cp, (rng.standard_normal(lead + (T, T)) * scale).astype(dtype), layout)  # (..., T, T)
    datt = relayout(cp, rng.standard_normal(lead + (T, T)).astype(dtype), layout)  # (..., T, T)
    att = causal_softmax_forward(preatt)
    dpreatt = causal_softmax_backward(datt, att)
    att_f = ck.causal_softmax_forward(preatt)
    assert (to_host(att_f)[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    assert_close(att_f, att, dtype, "att")
    assert_close(ck.causal_softmax_backward(datt, att_f), dpreatt, dtype, "dpreatt")
    assert_close(ck.causal_softmax_backward(datt, att), dpreatt, dtype, "dpreatt from the plain att")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_plain(ck, cp, dtype):
    """The whole attention kernel, with dropout, at the book's sizes (B 2, T 128, C 80, 4 heads)."""
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.standard_normal((2, 128, 80)).astype(dtype))  # (B, T, C)
    Ws = [cp.asarray((rng.standard_normal((4, 20, 80)) / np.sqrt(80)).astype(dtype)) for _ in range(3)]
    dout = cp.asarray(rng.standard_normal((2, 128, 80)).astype(dtype))  # (B, T, NH*hs)
    results = {}
    for kernels, forward, backward in (("plain", attention_forward, attention_backward),
                                       ("fused", ck.attention_forward, ck.attention_backward)):
        out, cache = forward(x, *Ws, 0.1, backend.make_rng(cp, 5))
        results[kernels] = (out, cache.att, *backward(dout, cache))
    for name, f, p in zip(("out", "att", "dx", "dWq", "dWk", "dWv"), results["fused"], results["plain"]):
        assert_close(f, p, dtype, name)


# ---- softmax cross-entropy --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(N=st.integers(1, 20), V=st.sampled_from([1, 2, 7, 32, 1000, 1025, 5000]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), layout=layouts, seed=seeds)
def test_cross_entropy_matches_plain(ck, cp, relayout, dtype, N, V, scale, layout, seed):
    rng = np.random.default_rng(seed)
    logits = relayout(cp, (rng.standard_normal((N, V)) * scale).astype(dtype), layout)  # (N, V)
    targets = rng.integers(0, V, size=N)  # (N,)
    targets[-1] = targets[0]  # a repeated target, on purpose
    targets = cp.asarray(targets)
    loss, cache = cross_entropy_forward(logits, targets)
    dlogits = cross_entropy_backward(1.0, cache)
    dlogits_chain = cross_entropy_backward(cp.asarray(2.5), cache)  # a 0-d dloss
    loss_f, cache_f = ck.cross_entropy_forward(logits, targets)
    assert loss_f.shape == () and loss_f.dtype == dtype
    assert_close(loss_f, loss, dtype, "loss")
    assert_close(cache_f.probs, cache.probs, dtype, "probs")
    np.testing.assert_array_equal(to_host(cache_f.targets), to_host(targets))
    assert_close(ck.cross_entropy_backward(1.0, cache_f), dlogits, dtype, "dlogits")
    assert_close(ck.cross_entropy_backward(cp.asarray(2.5), cache_f), dlogits_chain, dtype, "dlogits, 0-d dloss")
    assert_close(ck.cross_entropy_backward(1.0, cache), dlogits, dtype, "dlogits from the plain cache")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_book_vocabulary(ck, cp, dtype):
    """The book's vocabulary (100,218 logits a row): each thread walks ~100 of them."""
    rng = np.random.default_rng(2)
    logits = cp.asarray((rng.standard_normal((6, 100_218)) * 3).astype(dtype))  # (N, V)
    targets = cp.asarray(rng.integers(0, 100_218, size=6))  # (N,)
    loss, cache = cross_entropy_forward(logits, targets)
    dlogits = cross_entropy_backward(1.0, cache)
    loss_f, cache_f = ck.cross_entropy_forward(logits, targets)
    assert_close(loss_f, loss, dtype, "loss")
    assert_close(cache_f.probs, cache.probs, dtype, "probs")
    assert_close(ck.cross_entropy_backward(1.0, cache_f), dlogits, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_large_logits(ck, cp, dtype):
    """exp(1000) overflows; the fused kernel subtracts the row max like the plain one."""
    logits = cp.asarray(np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -999.0],
                                  [1000.0, 1000.0, 1000.0], [-1000.0, 1000.0, 999.0]], dtype=dtype))
    targets = cp.asarray([1, 2, 0, 2])
    loss, cache = cross_entropy_forward(logits, targets)
    loss_f, cache_f = ck.cross_entropy_forward(logits, targets)
    assert_close(loss_f, loss, dtype, "loss")
    assert_close(cache_f.probs, cache.probs, dtype, "probs")


@pytest.mark.parametrize("bad", [-1, 4])
def test_cross_entropy_target_out_of_range_is_refused(ck, cp, bad):
    """An id outside 0..V-1 raises IndexError, as the plain kernel does, instead of a NaN loss."""
    with pytest.raises(IndexError, match=r"target ids must lie in 0\.\.3"):
        ck.cross_entropy_forward(cp.zeros((2, 4)), cp.asarray([1, bad]))


# ---- AdamW ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [dict(), dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                                    dict(lr=1e-1, betas=(0.3, 0.5), eps=1e-8, weight_decay=0.0)],
                         ids=["defaults", "custom", "small-betas"])
def test_adamw_is_bit_identical_to_plain(ck, cp, dtype, config):
    """The kernel is adamw_update's arithmetic line for line, each operation rounded
    on its own (no fused multiply-add), so 20 steps agree to the last bit.
    If adamw_update's order of operations changes, the kernel must follow."""
    lr, (beta1, beta2) = config.get("lr", 1e-3), config.get("betas", (0.9, 0.999))
    eps, wd = config.get("eps", 1e-8), config.get("weight_decay", 0.01)
    rng = np.random.default_rng(3)
    shapes = {"wte": (50, 8), "ln.weight": (8,), "frozen": (3, 3), "head.view": (4, 2, 5)}
    start = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    steps = [{n: (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 2)).astype(dtype) for n, s in shapes.items()}
             for _ in range(20)]
    for g in steps:
        g["frozen"][...] = 0
    def state():  # name -> [p, m, v], copies on the device: the updates are in place
        return {n: [cp.array(a), cp.zeros(a.shape, dtype=dtype), cp.zeros(a.shape, dtype=dtype)]
                for n, a in start.items()}
    plain, fast = state(), state()
    storage = cp.array(np.stack([start["head.view"], start["head.view"]]))  # (2, 4, 2, 5)
    fast["head.view"][0] = storage[1]  # a parameter that is a view, like the model's per-head weights
    for t, g in enumerate(steps, start=1):
        for n, (p, m, v) in plain.items():
            adamw_update(p, cp.asarray(g[n]), m, v, lr, beta1, beta2, eps, wd, t)
        for n, (p, m, v) in fast.items():
            ck.adamw_update(p, cp.asarray(g[n]), m, v, lr, beta1, beta2, eps, wd, t)
    for n in shapes:
        for what, f, p in zip("pmv", fast[n], plain[n]):
            assert f.dtype == p.dtype == dtype
            np.testing.assert_array_equal(to_host(f), to_host(p), err_msg=f"{what} of {n}")
    np.testing.assert_array_equal(to_host(storage[0]), start["head.view"])  # the view's neighbour untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_optimizer_fused_matches_plain(cp, dtype):
    """FastAdamW.step (the CUDA kernel) against AdamW.step (plain CuPy) over a dict of parameters, bit for bit."""
    rng = np.random.default_rng(8)
    start = {"a": rng.standard_normal((6, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype)}
    grads = [{n: rng.standard_normal(a.shape).astype(dtype) for n, a in start.items()} for _ in range(5)]
    results = {}
    for on, optimizer in ((False, AdamW), (True, FastAdamW)):
        params = {n: cp.array(a) for n, a in start.items()}
        opt = optimizer(params, lr=1e-2)
        for g in grads:
            opt.step({n: cp.asarray(a) for n, a in g.items()})
        results[on] = params
    for n in start:
        np.testing.assert_array_equal(to_host(results[True][n]), to_host(results[False][n]), err_msg=n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_tables_update_every_parameter_in_one_launch(ck, cp, dtype, monkeypatch):
    """AdamWTables: one adamw_multi launch for parameters of many sizes (one larger than a
    block's chunk, one empty), bit-identical to adamw_update on each, and the per-block sums
    of squares add up to the squared global norm."""
    rng = np.random.default_rng(9)
    shapes = [(ck.ADAMW_CHUNK * 2 + 5,), (3, 7), (0,), (1,), (40, 33)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    plain = [[cp.array(a), cp.zeros(a.shape, dtype), cp.zeros(a.shape, dtype)] for a in start]
    fast = [[cp.array(a), cp.zeros(a.shape, dtype), cp.zeros(a.shape, dtype)] for a in start]
    tables = ck.AdamWTables(*[[f[i] for f in fast] for i in range(3)])
    launches = []
    kernel = ck._adamw_kernel(dtype)
    monkeypatch.setattr(ck, "_adamw_kernel", lambda d: lambda *a: (launches.append(a), kernel(*a)))
    for t in range(1, 4):
        grads = [cp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
        for (p, m, v), g in zip(plain, grads):
            adamw_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.01, t)
        squares = tables.step(grads, 1e-2, 0.9, 0.999, 1e-8, 0.01, t)
        want = sum(float((to_host(g).astype(np.float64) ** 2).sum()) for g in grads)
        assert abs(float(squares.sum()) - want) <= TOL[dtype]["rtol"] * want
    assert len(launches) == 3  # one per step
    for k, (f, p) in enumerate(zip(fast, plain)):
        for what, a, b in zip("pmv", f, p):
            np.testing.assert_array_equal(to_host(a), to_host(b), err_msg=f"{what} of parameter {k}")


# ---- the wiring -------------------------------------------------------------------------

def test_plain_kernels_never_call_the_cuda_kernels_and_fast_model_does(ck, cp, monkeypatch):
    """On CuPy arrays the plain kernels and Model stay plain; FastModel and FastAdamW run the CUDA twins."""
    from transformer.fast_model import FastModel
    from transformer import Model
    rng = np.random.default_rng(4)
    x = cp.asarray(rng.standard_normal((2, 5, 8)).astype("float32"))
    w, b = cp.ones(8, dtype="float32"), cp.zeros(8, dtype="float32")
    preatt = cp.asarray(rng.standard_normal((2, 3, 5, 5)).astype("float32"))
    names = ("layernorm_forward", "layernorm_backward", "causal_softmax_forward", "causal_softmax_backward",
             "attention_forward", "attention_backward", "cross_entropy_forward", "cross_entropy_backward")
    calls = []
    for name in names:
        monkeypatch.setattr(ck, name, lambda *a, _real=getattr(ck, name), _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    real_step = ck.AdamWTables.step  # FastAdamW's one launch for every parameter
    monkeypatch.setattr(ck.AdamWTables, "step", lambda self, *a: calls.append("AdamWTables.step") or real_step(self, *a))
    names += ("AdamWTables.step",)
    out, cache = layernorm_forward(x, w, b)
    layernorm_backward(out, cache)
    causal_softmax_backward(preatt, causal_softmax_forward(preatt))
    loss, ce = cross_entropy_forward(x.reshape(10, 8), cp.arange(10) % 8)
    cross_entropy_backward(1.0, ce)
    AdamW({"w": w}).step({"w": b + 1})
    h = dict(d_model=8, num_blocks=1, num_heads=2, context_length=5, dropout=0.0, max_token_value=11)
    ids = rng.integers(0, 11, size=(2, 5))
    plain = Model(h, backend="cupy", seed=1)
    AdamW(plain.params).step((plain(ids, ids), plain.backward())[1])
    assert calls == [], calls
    fast = FastModel(h, backend="cupy", seed=1)  # its kernel table takes the wrapped functions
    FastAdamW(fast.params).step((fast(ids, ids), fast.backward())[1])
    assert set(calls) == set(names), sorted(set(calls))


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_fused_matches_plain(cp, dtype):
    """A whole forward and backward of a small book-shaped model, FastModel (CUDA kernels) against Model (plain CuPy)."""
    from transformer import Model
    h = dict(d_model=32, num_blocks=2, num_heads=4, context_length=16, dropout=0.0, max_token_value=300)
    rng = np.random.default_rng(6)
    x, y = rng.integers(0, 300, size=(3, 16)), rng.integers(0, 300, size=(3, 16))
    from transformer.fast_model import FastModel
    results = {}
    for on, model_class in ((False, Model), (True, FastModel)):
        model = model_class(h, backend="cupy", dtype=dtype, seed=7)
        loss = model(x, y)[1]
        grads = model.backward()
        logits = model.eval()(x)[0]
        results[on] = (logits, loss, grads)
    (logits_p, loss_p, grads_p), (logits_f, loss_f, grads_f) = results[False], results[True]
    assert_close(logits_f, logits_p, dtype, "logits")
    assert abs(loss_f - loss_p) <= TOL[dtype]["rtol"] * abs(loss_p)
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], dtype, "d" + name)


# ---- no CUDA code on the NumPy path (these run everywhere) -------------------------------

def test_a_single_row_mean_is_compared_at_the_inputs_scale():
    """One row whose mean is ~0: its two computations may differ by an ulp of the inputs
    (~1e-7 in float32 for inputs of size 1), which is no error; measured against the mean
    itself it would fail, measured against the inputs it passes, and a real error still fails."""
    x = np.array([[1.0, -1.0, 3e-8]], dtype=np.float32)  # (1, C) mean 1e-8
    plain = x.mean(axis=-1, keepdims=True)  # (1, 1)
    fused = plain + np.float32(6e-8)  # one ulp of 1.0 away
    with pytest.raises(pytest.fail.Exception):
        assert_close(fused, plain, "float32", "mean")
    assert_close(fused, plain, "float32", "mean", scale=float(np.abs(x).max()))
    with pytest.raises(pytest.fail.Exception):
        assert_close(plain + np.float32(1e-3), plain, "float32", "mean", scale=float(np.abs(x).max()))


@pytest.mark.parametrize("sizes, chunk, tensor, first", [
    ([5, 0, 8, 1], 4, [0, 0, 2, 2, 3], [0, 4, 0, 4, 0]),
    ([4], 4, [0], [0]),
    ([], 4, [], []),
    ([0, 0], 4, [], []),
])
def test_adamw_block_table(sizes, chunk, tensor, first):
    """Each tensor cut into blocks of chunk elements, in order; an empty tensor gets no block."""
    from nanograd.fast import cuda_kernels
    got_tensor, got_first = cuda_kernels.block_table(sizes, chunk)
    assert got_tensor.dtype == np.int32 and got_first.dtype == np.int64
    np.testing.assert_array_equal(got_tensor, tensor)
    np.testing.assert_array_equal(got_first, first)


def run_python(code):
    """Run code in a fresh interpreter from the repository root; its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_reference_path_never_imports_the_fast_package():
    out = run_python(
        "import sys, numpy as np\n"
        "from transformer import Model\n"
        "from nanograd import AdamW\n"
        "m = Model(dict(d_model=8, num_blocks=1, num_heads=2, context_length=4, max_token_value=11))\n"
        "m(np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64))\n"
        "AdamW(m.params).step(m.backward())\n"
        "print(any(name.startswith('nanograd.fast') for name in sys.modules))\n")
    assert out.strip() == "False"
