"""Tests for nanograd/adamw.py: AdamW equal to torch.optim.AdamW, with resumable state.

Every test of the optimizer runs on the textbook AdamW and on its fast twin FastAdamW
(nanograd/fast/adamw.py, whose own machinery is tested in test_fast_adamw.py)."""
import inspect

import numpy as np
import pytest
import torch

from nanograd.adamw import AdamW
from nanograd.backend import to_host
from nanograd.fast.adamw import PART, FastAdamW

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


@pytest.fixture(params=[AdamW, FastAdamW], ids=["reference", "fast"])
def Optimizer(request):
    """The textbook AdamW, then FastAdamW: both must pass every test here."""
    return request.param


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
def test_matches_torch_every_step_float64(Optimizer, xp, config):
    params0, grads = initial_params(), gradients()
    expected, torch_steps = torch_run(params0, grads, **config)
    params = on(xp, params0)
    opt = Optimizer(params, **config)
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
def test_matches_torch_float32(Optimizer, xp, config):
    params0, grads = initial_params("float32"), gradients("float32")
    (p_t, m_t, v_t), _ = torch_run(params0, grads, **config)[0][-1], None
    params = on(xp, params0)
    opt = Optimizer(params, **config)
    for g in grads:
        opt.step(on(xp, g))
    for name in SHAPES:
        assert params[name].dtype == opt.m[name].dtype == opt.v[name].dtype == np.float32
        np.testing.assert_allclose(to_host(params[name]), p_t[name], **TOL32, err_msg=name)
        np.testing.assert_allclose(to_host(opt.m[name]), m_t[name], **TOL32, err_msg=name)
        np.testing.assert_allclose(to_host(opt.v[name]), v_t[name], **TOL32, err_msg=name)


def test_first_step_by_hand(Optimizer, xp):
    """Bias correction from t = 1: m_hat = g and v_hat = g^2, so the first step is
    p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    lr, wd, eps = 1e-2, 0.1, 1e-8
    p0 = np.array([1.0, -2.0, 0.5, 3.0])
    g = np.array([0.3, -4.0, 1e-9, 0.0])
    params = {"p": xp.array(p0)}
    Optimizer(params, lr=lr, weight_decay=wd, eps=eps).step({"p": xp.asarray(g)})
    np.testing.assert_allclose(to_host(params["p"]), p0 * (1 - lr * wd) - lr * g / (np.abs(g) + eps),
                               rtol=1e-12)


def test_zero_gradient_only_decays(Optimizer, xp):
    """m and v stay exactly 0, so the only change is the decoupled decay."""
    lr, wd = 1e-2, 0.1
    p0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    params = {"p": xp.array(p0)}
    opt = Optimizer(params, lr=lr, weight_decay=wd)
    for _ in range(STEPS):
        opt.step({"p": xp.zeros((2, 2))})
    assert not to_host(opt.m["p"]).any() and not to_host(opt.v["p"]).any()
    np.testing.assert_allclose(to_host(params["p"]), p0 * (1 - lr * wd) ** STEPS, rtol=1e-13)


def test_updates_in_place(Optimizer, xp):
    w = xp.asarray(np.ones(3))
    params = {"w": w}
    Optimizer(params).step({"w": xp.asarray(np.ones(3))})
    assert params["w"] is w
    assert (to_host(w) < 1).all()


def run_steps(opt, grads, xp):
    for g in grads:
        opt.step(on(xp, g))


def test_resume_from_state_dict_is_bit_identical(Optimizer, xp):
    """10 steps, save, 10 more on a fresh optimizer loaded from the saved state
    == 20 straight.  The saved state is copied to the host (as a checkpoint
    would be) and the fresh optimizer gets new arrays in another order, built with
    other hyperparameters: only the names tie the state to the parameters."""
    config = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    grads = gradients()

    straight = on(xp, initial_params())
    opt = Optimizer(straight, **config)
    run_steps(opt, grads, xp)

    first = on(xp, initial_params())
    opt1 = Optimizer(first, **config)
    run_steps(opt1, grads[:10], xp)
    state = opt1.state_dict()
    state = dict(state, m={n: to_host(a).copy() for n, a in state["m"].items()},
                 v={n: to_host(a).copy() for n, a in state["v"].items()})  # on the host, as read from a file
    saved_params = {name: to_host(first[name]).copy() for name in reversed(list(SHAPES))}

    resumed = on(xp, saved_params)  # new arrays, reversed order
    opt2 = Optimizer(resumed, lr=0.5, betas=(0.0, 0.0), eps=1.0, weight_decay=0.0)
    opt2.load_state_dict(state)
    assert (opt2.lr, opt2.betas, opt2.eps, opt2.weight_decay, opt2.t) == (
        config["lr"], config["betas"], config["eps"], config["weight_decay"], 10)
    run_steps(opt2, grads[10:], xp)

    for name in SHAPES:
        np.testing.assert_array_equal(to_host(resumed[name]), to_host(straight[name]), err_msg=name)
        np.testing.assert_array_equal(to_host(opt2.m[name]), to_host(opt.m[name]), err_msg=name)
        np.testing.assert_array_equal(to_host(opt2.v[name]), to_host(opt.v[name]), err_msg=name)
    assert opt2.t == opt.t == STEPS


def test_state_is_keyed_by_name(Optimizer, xp):
    params = on(xp, initial_params())
    opt = Optimizer(params)
    opt.step(on(xp, gradients(steps=1)[0]))
    state = opt.state_dict()
    assert set(state["m"]) == set(state["v"]) == set(SHAPES)
    for name in SHAPES:
        assert state["m"][name].shape == SHAPES[name]
    assert state["t"] == 1


def test_state_dict_is_a_snapshot(Optimizer, xp):
    """Saving then stepping on must not change what was saved: t is saved by
    value, so m and v must be too, or a later load pairs old t with new moments."""
    params = on(xp, initial_params())
    opt = Optimizer(params)
    grads = gradients(steps=2)
    opt.step(on(xp, grads[0]))
    state = opt.state_dict()
    m1 = {name: to_host(a).copy() for name, a in state["m"].items()}
    opt.step(on(xp, grads[1]))
    for name in SHAPES:
        np.testing.assert_array_equal(to_host(state["m"][name]), m1[name], err_msg=name)
    assert state["t"] == 1


def test_step_returns_the_gradients_global_norm(Optimizer, xp):
    """step() sums the squares of every gradient element as it reads them (parameters of
    several PART-sized parts included) and returns the norm; non-finite when a gradient is."""
    rng = np.random.default_rng(8)
    shapes = {"big": (PART * 2 + 7,), "w": (3, 4), "b": (5,)}
    params = {name: xp.asarray(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    expected = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    opt = Optimizer(params)
    assert opt.step(on(xp, grads)) == pytest.approx(expected, rel=1e-5)
    grads["w"][1, 2] = np.nan
    assert not np.isfinite(opt.step(on(xp, grads)))


def test_non_contiguous_parameter_is_refused(Optimizer, xp):
    """Parameters are updated in place through flat views, so they must be C-contiguous."""
    with pytest.raises(ValueError, match="parameter w "):
        Optimizer({"w": xp.zeros((4, 3)).T})




def test_no_decay_matches_torchs_two_param_groups(Optimizer, xp):
    """no_decay = nanoGPT's second param group: torch.optim.AdamW([{params: the rest,
    weight_decay 0.1}, {params: no_decay, weight_decay 0.0}]) gives the same parameters and
    moments each step; the frozen one (gradient 0, not decayed) stays exactly where it was."""
    config = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    no_decay = {"ln.weight", "frozen"}
    params0, grads = initial_params(), gradients()
    ts = {name: torch.tensor(p, requires_grad=True) for name, p in params0.items()}
    groups = [{"params": [t for n, t in ts.items() if n not in no_decay]},
              {"params": [t for n, t in ts.items() if n in no_decay], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, **config)
    params = on(xp, params0)
    opt = Optimizer(params, no_decay=no_decay, **config)
    for step, g in enumerate(grads, start=1):
        for name, t in ts.items():
            t.grad = torch.tensor(g[name])
        torch_opt.step()
        opt.step(on(xp, g))
        for name, t in ts.items():
            np.testing.assert_allclose(to_host(params[name]), t.detach().numpy(), **TOL64, err_msg=f"{name} {step}")
            np.testing.assert_allclose(to_host(opt.m[name]), torch_opt.state[t]["exp_avg"].numpy(), **TOL64,
                                       err_msg=f"m {name} {step}")
    np.testing.assert_array_equal(to_host(params["frozen"]), params0["frozen"])
    decayed_everywhere = on(xp, params0)
    Optimizer(decayed_everywhere, **config).step(on(xp, grads[0]))
    assert not np.array_equal(to_host(decayed_everywhere["frozen"]), params0["frozen"])  # the groups differ
