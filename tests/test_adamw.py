"""Tests for nanograd/adamw.py: AdamW equal to torch.optim.AdamW, with resumable state."""
import inspect

import numpy as np
import pytest
import torch

from nanograd.adamw import BLOCK, PART, AdamW, adamw_update, adamw_update_blocked, element_groups
from nanograd.backend import to_host

# float64 against torch.optim.AdamW: the same formulas in the same order
# (decay, lerp for m, mul+addcmul for v, bias corrections as Python floats),
# so after 20 steps the parameters and moments agree to a few ulps; the
# issue's rtol 1e-9.  atol 1e-12: a parameter or moment passing through 0
# has no meaningful relative error, and the steps are >= ~1e-4 in size.
TOL64 = dict(rtol=1e-9, atol=1e-12)
# float32 against the float64 oracle on the same (float32-rounded) starting
# values and gradients: each step rounds p, m, v and the update to float32
# (6e-8 relative); over 20 steps of size ~lr that stays below ~1e-6 of the
# O(1) parameters, so rtol 1e-5; atol 1e-6 for entries passing through 0.
TOL32 = dict(rtol=1e-5, atol=1e-6)

SHAPES = {"wte": (5, 3), "ln.weight": (3,), "frozen": (2, 2), "head": (4, 1, 2)}
ZERO_GRAD = "frozen"  # its gradient is exactly 0 at every step
STEPS = 20

CONFIGS = [
    dict(),  # torch's defaults
    dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-1, betas=(0.3, 0.5), eps=1e-8, weight_decay=0.0),  # torch's lerp takes its other branch
]


def initial_params(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def gradients(dtype="float64", seed=1, steps=STEPS):
    """One dict of gradients per step, the same ones for us and for torch."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
        g[ZERO_GRAD] = np.zeros(SHAPES[ZERO_GRAD], dtype=dtype)
        out.append(g)
    return out


def on(xp, arrays):
    """Copies on xp's device (np.asarray would share memory, and the optimizer updates in place)."""
    return {name: xp.array(a) for name, a in arrays.items()}


def torch_run(params, grads, **config):
    """torch.optim.AdamW, float64, after every step: list of (params, exp_avg, exp_avg_sq) dicts."""
    ts = {name: torch.tensor(np.asarray(p, dtype=np.float64), requires_grad=True) for name, p in params.items()}
    opt = torch.optim.AdamW(list(ts.values()), **config)
    history = []
    for g in grads:
        for name, t in ts.items():
            t.grad = torch.tensor(np.asarray(g[name], dtype=np.float64))
        opt.step()
        history.append(tuple({name: f(t) for name, t in ts.items()} for f in (
            lambda t: t.detach().numpy().copy(),
            lambda t: opt.state[t]["exp_avg"].numpy().copy(),
            lambda t: opt.state[t]["exp_avg_sq"].numpy().copy())))
    return history, int(opt.state[ts["wte"]]["step"])


def test_defaults_are_torchs():
    ours = inspect.signature(AdamW).parameters
    theirs = inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "betas", "eps", "weight_decay"):
        assert ours[name].default == theirs[name].default, name
    assert (ours["lr"].default, ours["betas"].default, ours["eps"].default,
            ours["weight_decay"].default) == (1e-3, (0.9, 0.999), 1e-8, 0.01)


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "custom", "small-betas"])
def test_matches_torch_every_step_float64(xp, config):
    params0, grads = initial_params(), gradients()
    expected, torch_steps = torch_run(params0, grads, **config)
    params = on(xp, params0)
    opt = AdamW(params, **config)
    for step, (g, (p_t, m_t, v_t)) in enumerate(zip(grads, expected), start=1):
        opt.step(on(xp, g))
        assert opt.t == step
        for name in SHAPES:
            assert params[name].dtype == np.float64
            np.testing.assert_allclose(to_host(params[name]), p_t[name], **TOL64, err_msg=f"{name} step {step}")
            np.testing.assert_allclose(to_host(opt.m[name]), m_t[name], **TOL64, err_msg=f"m {name} step {step}")
            np.testing.assert_allclose(to_host(opt.v[name]), v_t[name], **TOL64, err_msg=f"v {name} step {step}")
    assert opt.t == torch_steps == STEPS


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "custom", "small-betas"])
def test_matches_torch_float32(xp, config):
    params0, grads = initial_params("float32"), gradients("float32")
    (p_t, m_t, v_t), _ = torch_run(params0, grads, **config)[0][-1], None
    params = on(xp, params0)
    opt = AdamW(params, **config)
    for g in grads:
        opt.step(on(xp, g))
    for name in SHAPES:
        assert params[name].dtype == opt.m[name].dtype == opt.v[name].dtype == np.float32
        np.testing.assert_allclose(to_host(params[name]), p_t[name], **TOL32, err_msg=name)
        np.testing.assert_allclose(to_host(opt.m[name]), m_t[name], **TOL32, err_msg=name)
        np.testing.assert_allclose(to_host(opt.v[name]), v_t[name], **TOL32, err_msg=name)


def test_first_step_by_hand(xp):
    """Bias correction from t = 1: m_hat = g and v_hat = g^2, so the first step is
    p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    lr, wd, eps = 1e-2, 0.1, 1e-8
    p0 = np.array([1.0, -2.0, 0.5, 3.0])
    g = np.array([0.3, -4.0, 1e-9, 0.0])
    params = {"p": xp.array(p0)}
    AdamW(params, lr=lr, weight_decay=wd, eps=eps).step({"p": xp.asarray(g)})
    np.testing.assert_allclose(to_host(params["p"]), p0 * (1 - lr * wd) - lr * g / (np.abs(g) + eps),
                               rtol=1e-12)


def test_zero_gradient_only_decays(xp):
    """m and v stay exactly 0, so the only change is the decoupled decay."""
    lr, wd = 1e-2, 0.1
    p0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    params = {"p": xp.array(p0)}
    opt = AdamW(params, lr=lr, weight_decay=wd)
    for _ in range(STEPS):
        opt.step({"p": xp.zeros((2, 2))})
    assert not to_host(opt.m["p"]).any() and not to_host(opt.v["p"]).any()
    np.testing.assert_allclose(to_host(params["p"]), p0 * (1 - lr * wd) ** STEPS, rtol=1e-13)


def test_updates_in_place(xp):
    w = xp.asarray(np.ones(3))
    params = {"w": w}
    AdamW(params).step({"w": xp.asarray(np.ones(3))})
    assert params["w"] is w
    assert (to_host(w) < 1).all()


def run_steps(opt, grads, xp):
    for g in grads:
        opt.step(on(xp, g))


def test_resume_from_state_dict_is_bit_identical(xp):
    """10 steps, save, 10 more on a fresh optimizer loaded from the saved state
    == 20 straight.  The saved state is copied to the host (as a checkpoint
    would be) and the fresh optimizer gets new arrays in another order, built with
    other hyperparameters: only the names tie the state to the parameters."""
    config = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    grads = gradients()

    straight = on(xp, initial_params())
    opt = AdamW(straight, **config)
    run_steps(opt, grads, xp)

    first = on(xp, initial_params())
    opt1 = AdamW(first, **config)
    run_steps(opt1, grads[:10], xp)
    state = opt1.state_dict()
    state = dict(state, m={n: to_host(a).copy() for n, a in state["m"].items()},
                 v={n: to_host(a).copy() for n, a in state["v"].items()})  # on the host, as read from a file
    saved_params = {name: to_host(first[name]).copy() for name in reversed(list(SHAPES))}

    resumed = on(xp, saved_params)  # new arrays, reversed order
    opt2 = AdamW(resumed, lr=0.5, betas=(0.0, 0.0), eps=1.0, weight_decay=0.0)
    opt2.load_state_dict(state)
    assert (opt2.lr, opt2.betas, opt2.eps, opt2.weight_decay, opt2.t) == (
        config["lr"], config["betas"], config["eps"], config["weight_decay"], 10)
    run_steps(opt2, grads[10:], xp)

    for name in SHAPES:
        np.testing.assert_array_equal(to_host(resumed[name]), to_host(straight[name]), err_msg=name)
        np.testing.assert_array_equal(to_host(opt2.m[name]), to_host(opt.m[name]), err_msg=name)
        np.testing.assert_array_equal(to_host(opt2.v[name]), to_host(opt.v[name]), err_msg=name)
    assert opt2.t == opt.t == STEPS


def test_state_is_keyed_by_name(xp):
    params = on(xp, initial_params())
    opt = AdamW(params)
    opt.step(on(xp, gradients(steps=1)[0]))
    state = opt.state_dict()
    assert set(state["m"]) == set(state["v"]) == set(SHAPES)
    for name in SHAPES:
        assert state["m"][name].shape == SHAPES[name]
    assert state["t"] == 1


def test_state_dict_is_a_snapshot(xp):
    """Saving then stepping on must not change what was saved: t is saved by
    value, so m and v must be too, or a later load pairs old t with new moments."""
    params = on(xp, initial_params())
    opt = AdamW(params)
    grads = gradients(steps=2)
    opt.step(on(xp, grads[0]))
    state = opt.state_dict()
    m1 = {name: to_host(a).copy() for name, a in state["m"].items()}
    opt.step(on(xp, grads[1]))
    for name in SHAPES:
        np.testing.assert_array_equal(to_host(state["m"][name]), m1[name], err_msg=name)
    assert state["t"] == 1


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


def test_step_returns_the_gradients_global_norm(xp):
    """step() sums the squares of every gradient element as it reads them (parameters of
    several PART-sized parts included) and returns the norm; non-finite when a gradient is."""
    rng = np.random.default_rng(8)
    shapes = {"big": (PART * 2 + 7,), "w": (3, 4), "b": (5,)}
    params = {name: xp.asarray(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    expected = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    opt = AdamW(params)
    assert opt.step(on(xp, grads)) == pytest.approx(expected, rel=1e-5)
    grads["w"][1, 2] = np.nan
    assert not np.isfinite(opt.step(on(xp, grads)))


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


def test_non_contiguous_parameter_is_refused(xp):
    """Parameters are updated in place through flat views, so they must be C-contiguous."""
    with pytest.raises(ValueError, match="parameter w "):
        AdamW({"w": xp.zeros((4, 3)).T})


def test_moments_never_decay_into_denormals(xp):
    """Gradients that stop (an embedding row whose token stops appearing) leave moments that
    shrink by beta each step; below float32's smallest normal (1.2e-38) every operation on
    them is ~100x slower on x86.  AdamW zeroes moments under TINY first, every
    flush_interval() steps, and the weights stay as torch's to float32 rounding."""
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

