"""Tests for nanograd/fast/adamw.py: FastAdamW's blocks, threads, early start and flush
are bit-identical to the textbook AdamW (the torch oracle tests of test_adamw.py run on both)."""
import numpy as np
import pytest
import torch

from nanograd.adamw import adamw_update
from nanograd.backend import to_host
from nanograd.fast.adamw import BLOCK, PART, FastAdamW as AdamW, adamw_update_blocked, element_groups
from test_adamw import SHAPES, TOL32, on


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(3,), (BLOCK + 5,), (3, BLOCK // 2 + 1)], ids=["small", "blocks", "2d"])
def test_blocked_update_equals_textbook(dtype, shape):
    """The cache-blocked NumPy path does the textbook's operations in the same order:
    bit-identical parameters and moments, across block boundaries."""
    rng = np.random.default_rng(5)
    hyper = dict(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    plain = [rng.standard_normal(shape).astype(dtype), np.zeros(shape, dtype), np.zeros(shape, dtype)]
    blocked = [a.copy() for a in plain]
    for t in range(1, 6):
        g = rng.standard_normal(shape).astype(dtype)
        adamw_update(plain[0], g, plain[1], plain[2], t=t, **hyper)
        adamw_update_blocked(blocked[0], g, blocked[1], blocked[2], t=t, **hyper)
    for name, a, b in zip("pmv", plain, blocked):
        assert b.dtype == dtype
        np.testing.assert_array_equal(b, a, err_msg=name)


def test_threaded_parts_equal_textbook():
    """AdamW.step cuts big parameters into PART-sized pieces for the CPU threads:
    still bit-identical to the textbook update of the whole array."""
    rng = np.random.default_rng(6)
    p = rng.standard_normal(PART * 2 + 7).astype(np.float32)
    plain = [p.copy(), np.zeros_like(p), np.zeros_like(p)]
    opt = AdamW({"w": p}, lr=1e-2)
    for t in range(1, 4):
        g = rng.standard_normal(p.shape).astype(np.float32)
        adamw_update(plain[0], g, plain[1], plain[2], 1e-2, 0.9, 0.999, 1e-8, 0.01, t)
        opt.step({"w": g})
    for a, b in zip(plain, (p, opt.m["w"], opt.v["w"])):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("started", [(), ("head",), ("head", "wte"), tuple(SHAPES) + ("big",)])
def test_start_then_step_equals_step(xp, started):
    """start() on some parameters (one of them cut into PART-sized parts), then step():
    bit-identical parameters, moments, t and norm to step() alone, step after step."""
    rng = np.random.default_rng(9)
    shapes = {**SHAPES, "big": (PART * 2 + 3,)}
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    plain, early = AdamW(on(xp, params), lr=1e-2), AdamW(on(xp, params), lr=1e-2)
    for _ in range(3):
        grads = on(xp, {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()})
        early.start({name: grads[name] for name in started})
        assert early.step(grads) == plain.step(grads)
    assert early.t == plain.t == 3
    for name in shapes:
        for a, b in ((early.params, plain.params), (early.m, plain.m), (early.v, plain.v)):
            np.testing.assert_array_equal(to_host(a[name]), to_host(b[name]), err_msg=name)


def test_moments_never_decay_into_denormals():
    """Gradients that stop (an embedding row whose token stops appearing) leave moments that
    shrink by beta each step; below float32's smallest normal (1.2e-38) every operation on
    them is ~100x slower on x86.  On NumPy AdamW zeroes moments under TINY first, every
    flush_interval() steps, and the weights stay as torch's to float32 rounding.  (A GPU
    needs no flush: test_cupy_step_is_one_launch_without_a_flush.)"""
    xp = np
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal(64).astype(np.float32) * 1e-3
    params = {"w": xp.asarray(p0.copy())}
    opt = AdamW(params)
    assert opt.flush_interval() == 173  # beta1 0.9: TINY * 0.9**173 >= 1.2e-38 > TINY * 0.9**174
    torch_p = torch.tensor(p0.copy(), requires_grad=True)
    torch_opt = torch.optim.AdamW([torch_p])
    smallest_normal = np.finfo(np.float32).tiny
    for step in range(1000):
        grad = g if step < 3 else np.zeros_like(g)  # three real gradients, then nothing
        opt.step({"w": xp.asarray(grad)})
        torch_p.grad = torch.tensor(grad)
        torch_opt.step()
        m, v = (np.abs(to_host(a)) for a in (opt.m["w"], opt.v["w"]))
        for moment in (m, v):
            assert not ((moment > 0) & (moment < smallest_normal)).any(), f"a denormal moment at step {step + 1}"
    torch_m = torch_opt.state[torch_p]["exp_avg"].numpy()
    assert ((np.abs(torch_m) > 0) & (np.abs(torch_m) < smallest_normal)).any()  # torch's did decay that far
    assert (to_host(opt.m["w"]) == 0).all()  # flushed: they fell under TINY
    np.testing.assert_allclose(to_host(params["w"]), torch_p.detach().numpy(), **TOL32)


def test_flush_keeps_moments_above_tiny():
    params = {"w": np.ones(4, np.float32)}
    opt = AdamW(params)
    opt.m["w"][:] = [1e-29, -1e-29, 1e-31, -1e-31]
    opt.v["w"][:] = [1e-29, 1e-29, 1e-31, 1e-31]
    opt.t = opt.flush_interval() - 1  # the next step flushes
    opt.step({"w": np.zeros(4, np.float32)})
    m, v = opt.m["w"], opt.v["w"]
    assert (m[:2] != 0).all() and (m[2:] == 0).all()
    assert (v[:2] != 0).all() and (v[2:] == 0).all()


@pytest.mark.parametrize("sizes, part", [([10, 3, 0, 25, 1], 8), ([5], 100), ([], 4), ([16, 16], 16)])
def test_element_groups_cover_every_element_once(sizes, part):
    groups = element_groups(sizes, part)
    covered = [np.zeros(n, dtype=int) for n in sizes]
    for group in groups:
        assert group, "no empty groups"
        assert sum(stop - start for _, start, stop in group) < 2 * part  # about `part` each
        for i, start, stop in group:
            assert 0 <= start < stop <= sizes[i] and stop - start <= part
            covered[i][start:stop] += 1
    assert all((c == 1).all() for c in covered)
    if sum(sizes) > part:
        assert len(groups) >= sum(sizes) // part  # big work is spread over several tasks



def test_cupy_step_is_one_launch_without_a_flush(cp, monkeypatch):
    """On CuPy, FastAdamW keeps m and v in one flat buffer each and updates every parameter
    (views of a shared storage among them, like the model's per-head weights) with one
    adamw_multi launch a step, flushing nothing: bit-identical to the plain AdamW on CuPy,
    across a flush step, with tiny moments left to decay as torch's do; the norm is the
    gradients' global norm."""
    from nanograd.adamw import AdamW as PlainAdamW
    from nanograd.clip import grad_norm
    from nanograd.fast import cuda_kernels
    rng = np.random.default_rng(12)
    storage = rng.standard_normal((3, 2, 4, 6)).astype(np.float32)  # (3, NH, hs, C)
    start = {**{f"w{j}.{h}": storage[j, h] for j in range(3) for h in range(2)},
             "wte": rng.standard_normal((50, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
             "big": rng.standard_normal(cuda_kernels.ADAMW_CHUNK + 7).astype(np.float32)}

    def params():  # the views share one device storage, as Model's Wq/Wk/Wv do
        qkv = cp.asarray(storage)
        return {n: qkv[int(n[1]), int(n[3])] if n.startswith("w") else cp.asarray(a) for n, a in start.items()}
    plain, fast = PlainAdamW(params()), AdamW(params())
    assert fast.tables is not None and fast.flat_m.size == sum(a.size for a in start.values())
    for opt in (plain, fast):
        opt.m["b"][...] = cp.asarray([1e-31, -1e-31, 1e-29, 0, 0, 0], dtype=cp.float32)  # below and above TINY
    launches = []
    kernel = cuda_kernels._adamw_kernel(np.float32)
    monkeypatch.setattr(cuda_kernels, "_adamw_kernel", lambda d: lambda *a: (launches.append(a), kernel(*a)))
    steps = fast.flush_interval() + 2
    for step in range(steps):
        grads = {n: cp.asarray(rng.standard_normal(a.shape).astype(np.float32) * (step < 3)) for n, a in start.items()}
        want_norm = grad_norm(grads)
        fast.start({"wte": grads["wte"]})  # a no-op on CuPy
        norm = fast.step(grads)
        assert abs(norm - want_norm) <= 1e-5 * want_norm
        plain.step(grads)
    assert len(launches) == steps  # one launch a step, for all 10 parameters
    assert float(cp.abs(fast.m["b"][0])) > 0  # not flushed: decays like torch's
    for name in start:
        for a, b in ((fast.params, plain.params), (fast.m, plain.m), (fast.v, plain.v)):
            np.testing.assert_array_equal(to_host(a[name]), to_host(b[name]), err_msg=name)
    resumed = AdamW(params())  # the moments load into the flat buffers' views
    resumed.load_state_dict(fast.state_dict())
    assert resumed.m["big"].base is not None and float(cp.abs(resumed.flat_m).sum()) == float(cp.abs(fast.flat_m).sum())


def test_no_decay_parts_equal_textbook(xp):
    """A no_decay parameter cut into PART-sized parts for the threads (or, on CuPy, updated by a
    launch of its own): bit-identical to the textbook AdamW with the same no_decay."""
    from nanograd.adamw import AdamW as PlainAdamW
    rng = np.random.default_rng(11)
    shapes = {"w": (5, 3), "big": (PART * 2 + 3,), "b": (7,)}
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    config = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, no_decay={"big", "b"})
    plain, fast = PlainAdamW(on(xp, params), **config), AdamW(on(xp, params), **config)
    for _ in range(3):
        grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        assert fast.step(on(xp, grads)) == pytest.approx(plain.step(on(xp, grads)), rel=1e-5)  # float32 sums
    for name in shapes:
        for a, b in ((fast.params, plain.params), (fast.m, plain.m), (fast.v, plain.v)):
            np.testing.assert_array_equal(to_host(a[name]), to_host(b[name]), err_msg=name)
