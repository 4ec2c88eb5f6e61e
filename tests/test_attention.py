"""Tests for nanograd/attention.py: causal multi-head self-attention with dropout on the weights."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from nanograd.attention import (attention_backward, attention_forward, causal_softmax_backward,
                                causal_softmax_forward)
from nanograd.backend import make_rng, to_host

# float64 against torch: three projections, a softmax and a weighted sum, each
# a sum of at most a few dozen terms taken in another order (and torch's
# softmax rounds exp differently), ~1e-15 relative to the terms; the issue's
# rtol 1e-9.  atol 1e-12: outputs and gradients that cancel to about 0 have no
# meaningful relative error.
# float32 against torch float64 on the same float32 values: every step rounds
# to float32 (6e-8) and errors compound through four matmuls and a softmax
# (exp amplifies an absolute error in a score into a relative one), so rtol
# 1e-4 and atol 1e-5 for values that cancel to about 0.  The data are scaled
# so that outputs and gradients are O(1).
TOL = {"float64": dict(rtol=1e-9, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}

seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(["C", "F", "strided"])
shapes = st.fixed_dictionaries(dict(B=st.integers(1, 2), T=st.integers(1, 4), C=st.integers(1, 4),
                                    NH=st.integers(1, 3), hs=st.integers(1, 3)))


def draw_inputs(rng, B, T, C, NH, hs, dtype="float64"):
    """x (B, T, C) and Wq, Wk, Wv (NH, hs, C), scaled so the scores are O(1)."""
    x = rng.standard_normal((B, T, C)).astype(dtype)  # (B, T, C)
    Ws = [(rng.standard_normal((NH, hs, C)) / np.sqrt(C)).astype(dtype) for _ in range(3)]  # (NH, hs, C)
    return [x, *Ws]


def torch_attention(x, Wq, Wk, Wv, keep=None):
    """The book's layout: every head its own bias-free linear layers, a causal
    softmax, our dropout mask (a constant) on the weights, heads concatenated."""
    B, T, C = x.shape
    NH, hs, _ = Wq.shape
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool))  # (T, T)
    heads = []
    for h in range(NH):
        q, k, v = (torch.nn.functional.linear(x, W[h]) for W in (Wq, Wk, Wv))  # (B, T, hs) each
        scores = (q @ k.transpose(-2, -1)) / hs ** 0.5  # (B, T, T)
        att = torch.softmax(scores.masked_fill(~lower, float("-inf")), dim=-1)  # (B, T, T)
        if keep is not None:
            att = att * keep[:, h]
        heads.append(att @ v)  # (B, T, hs)
    return torch.cat(heads, dim=-1)  # (B, T, NH*hs)


def reference_head(x, Wq, Wk, Wv):
    """One head written out with loops over batch and positions, NumPy float64.

    x (B, T, C), W (hs, C) -> (B, T, hs)."""
    B, T, C = x.shape
    hs = Wq.shape[0]
    out = np.zeros((B, T, hs))  # (B, T, hs)
    for b in range(B):
        q, k, v = x[b] @ Wq.T, x[b] @ Wk.T, x[b] @ Wv.T  # (T, hs) each
        for t in range(T):
            scores = np.array([q[t] @ k[s] for s in range(t + 1)]) / np.sqrt(hs)  # (t+1,) past only
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[b, t] = sum(weights[s] * v[s] for s in range(t + 1))
    return out


@given(shape=shapes, p=st.sampled_from([0.0, 0.3]), x_layout=layouts, W_layout=layouts, seed=seeds)
def test_backward_matches_finite_differences(xp, gradcheck, relayout, shape, p, x_layout, W_layout, seed):
    rng = np.random.default_rng(seed)
    x, Wq, Wk, Wv = draw_inputs(rng, **shape)
    x = relayout(xp, x, x_layout)
    Wq, Wk, Wv = (relayout(xp, W, W_layout) for W in (Wq, Wk, Wv))

    def forward(x, Wq, Wk, Wv):  # a fresh generator with one seed: the same mask on every call
        return attention_forward(x, Wq, Wk, Wv, p, make_rng(xp, seed))
    gradcheck("attention", forward, attention_backward, [x, Wq, Wk, Wv], [0, 1, 2, 3],
              ["x", "Wq", "Wk", "Wv"], seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(shape=shapes, p=st.sampled_from([0.0, 0.1, 0.5]), layout=layouts, seed=seeds)
def test_matches_torch(xp, host, relayout, dtype, shape, p, layout, seed):
    rng = np.random.default_rng(seed)
    inputs = [relayout(xp, a, layout) for a in draw_inputs(rng, dtype=dtype, **shape)]
    B, T, NH, hs = shape["B"], shape["T"], shape["NH"], shape["hs"]
    dout = xp.asarray(rng.standard_normal((B, T, NH * hs)).astype(dtype))  # (B, T, NH*hs)
    before = [host(a) for a in inputs]
    out, cache = attention_forward(*inputs, p, make_rng(xp, seed))
    grads = attention_backward(dout, cache)
    for a, a0 in zip(inputs, before):
        np.testing.assert_array_equal(host(a), a0)  # no writes into inputs
    assert out.shape == (B, T, NH * hs) and out.dtype == dtype
    assert (cache.dropout.keep is None) == (p == 0.0)

    keep = None if p == 0.0 else torch.tensor(host(cache.dropout.keep))  # (B, NH, T, T) constant
    ts = [torch.tensor(host(a), requires_grad=True) for a in inputs]  # float64
    out_t = torch_attention(*ts, keep=keep)
    out_t.backward(torch.tensor(host(dout)))
    np.testing.assert_allclose(host(out), out_t.detach().numpy(), **TOL[dtype])
    for name, g, t, a in zip(("dx", "dWq", "dWk", "dWv"), grads, ts, inputs):
        assert g.shape == a.shape and g.dtype == dtype, name
        np.testing.assert_allclose(host(g), t.grad.numpy(), **TOL[dtype], err_msg=name)


@given(shape=shapes, t0=st.integers(0, 3), p=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_causal(xp, shape, t0, p, seed):
    """Changing x at positions >= t0 leaves the outputs before t0 alone, and an
    upstream gradient only before t0 gives x no gradient from t0 on."""
    T = shape["T"]
    t0 = min(t0, T - 1)
    rng = np.random.default_rng(seed)
    x, Wq, Wk, Wv = (xp.asarray(a) for a in draw_inputs(rng, **shape))
    x2 = x.copy()
    x2[:, t0:] = xp.asarray(rng.standard_normal(x2[:, t0:].shape) * 10)
    out, cache = attention_forward(x, Wq, Wk, Wv, p, make_rng(xp, seed))
    out2, _ = attention_forward(x2, Wq, Wk, Wv, p, make_rng(xp, seed))
    np.testing.assert_allclose(to_host(out2[:, :t0]), to_host(out[:, :t0]), rtol=1e-13, atol=1e-15)
    if p == 0.0:  # (with dropout a whole row of weights may be dropped, and its output stays 0)
        assert not np.allclose(to_host(out2[:, t0:]), to_host(out[:, t0:]))  # the later ones do move

    att = to_host(cache.att)  # (B, NH, T, T)
    assert (np.triu(att, k=1) == 0).all()  # no weight on the future
    np.testing.assert_allclose(att.sum(axis=-1), 1, rtol=1e-14)

    dout = xp.asarray(rng.standard_normal(out.shape))  # (B, T, NH*hs)
    dout[:, t0:] = 0
    dx = to_host(attention_backward(dout, cache)[0])
    np.testing.assert_array_equal(dx[:, t0:], 0)


@given(shape=shapes, seed=seeds)
def test_one_head_equals_hand_written_reference(xp, shape, seed):
    shape = dict(shape, NH=1)
    rng = np.random.default_rng(seed)
    x, Wq, Wk, Wv = draw_inputs(rng, **shape)
    out, _ = attention_forward(*(xp.asarray(a) for a in (x, Wq, Wk, Wv)))
    np.testing.assert_allclose(to_host(out), reference_head(x, Wq[0], Wk[0], Wv[0]),
                               rtol=1e-12, atol=1e-14)


@given(shape=shapes, seed=seeds)
def test_heads_are_concatenated(xp, shape, seed):
    """Head h's output is columns h*hs:(h+1)*hs, the book's torch.cat of separate heads."""
    rng = np.random.default_rng(seed)
    x, Wq, Wk, Wv = draw_inputs(rng, **shape)
    out = to_host(attention_forward(*(xp.asarray(a) for a in (x, Wq, Wk, Wv)))[0])
    hs = shape["hs"]
    for h in range(shape["NH"]):
        np.testing.assert_allclose(out[..., h * hs:(h + 1) * hs],
                                   reference_head(x, Wq[h], Wk[h], Wv[h]), rtol=1e-12, atol=1e-14)


def test_one_position_returns_v(xp):
    """With T = 1 the only weight is 1, so out = v = x @ Wv.T."""
    rng = np.random.default_rng(0)
    x, Wq, Wk, Wv = (xp.asarray(a) for a in draw_inputs(rng, B=2, T=1, C=3, NH=2, hs=2))
    out, cache = attention_forward(x, Wq, Wk, Wv)
    np.testing.assert_array_equal(to_host(cache.att), 1)
    expected = np.einsum("btc,nhc->btnh", to_host(x), to_host(Wv)).reshape(2, 1, 4)
    np.testing.assert_allclose(to_host(out), expected, rtol=1e-13)


def test_eval_mode_ignores_dropout(xp):
    rng = np.random.default_rng(1)
    inputs = [xp.asarray(a) for a in draw_inputs(rng, B=2, T=4, C=4, NH=2, hs=2)]
    out_eval, cache = attention_forward(*inputs, 0.5, make_rng(xp, 0), train=False)
    out_plain, _ = attention_forward(*inputs)
    assert cache.dropout.keep is None
    np.testing.assert_array_equal(to_host(out_eval), to_host(out_plain))
    out_train, _ = attention_forward(*inputs, 0.5, make_rng(xp, 0), train=True)
    assert not np.allclose(to_host(out_train), to_host(out_plain))


def test_large_scores_do_not_overflow(xp):
    rng = np.random.default_rng(2)
    x, Wq, Wk, Wv = (xp.asarray(a) for a in draw_inputs(rng, B=1, T=4, C=4, NH=2, hs=2))
    out, cache = attention_forward(x * 1e3, Wq, Wk, Wv)  # scores ~ 1e6
    assert np.isfinite(to_host(out)).all()
    np.testing.assert_allclose(to_host(cache.att).sum(axis=-1), 1, rtol=1e-14)
    grads = attention_backward(xp.ones_like(out), cache)
    assert all(np.isfinite(to_host(g)).all() for g in grads)


def softmax_kernel(preatt):
    """causal_softmax as a forward/backward pair for check_kernel: the cache is att."""
    att = causal_softmax_forward(preatt)  # (..., T, T)
    return att, att


@given(lead=st.lists(st.integers(1, 2), max_size=2).map(tuple), T=st.integers(1, 5),
       layout=layouts, seed=seeds)
def test_causal_softmax_matches_finite_differences(xp, gradcheck, relayout, lead, T, layout, seed):
    rng = np.random.default_rng(seed)
    preatt = relayout(xp, rng.standard_normal(lead + (T, T)) * 2, layout)  # (..., T, T)
    gradcheck("causal_softmax", softmax_kernel, causal_softmax_backward, [preatt], [0], ["preatt"], seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), T=st.integers(1, 6),
       scale=st.sampled_from([1.0, 30.0]), layout=layouts, seed=seeds)
def test_causal_softmax_matches_torch(xp, host, relayout, dtype, lead, T, scale, layout, seed):
    rng = np.random.default_rng(seed)
    preatt = relayout(xp, (rng.standard_normal(lead + (T, T)) * scale).astype(dtype), layout)  # (..., T, T)
    datt = xp.asarray(rng.standard_normal(lead + (T, T)).astype(dtype))  # (..., T, T)
    before = host(preatt)
    att = causal_softmax_forward(preatt)
    dpreatt = causal_softmax_backward(datt, att)
    np.testing.assert_array_equal(host(preatt), before)  # no writes into inputs
    assert att.dtype == dpreatt.dtype == dtype
    assert (np.triu(to_host(att), k=1) == 0).all() and (np.triu(to_host(dpreatt), k=1) == 0).all()

    preatt_t = torch.tensor(host(preatt), requires_grad=True)  # float64
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool))  # (T, T)
    att_t = torch.softmax(preatt_t.masked_fill(~lower, float("-inf")), dim=-1)
    att_t.backward(torch.tensor(host(datt)))
    np.testing.assert_allclose(host(att), att_t.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(host(dpreatt), preatt_t.grad.numpy(), **TOL[dtype])
