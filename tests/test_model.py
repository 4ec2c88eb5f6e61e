"""Tests for transformer/model.py: the whole model against the PyTorch oracle of the book's ch.18
model (transformer/book_torch.py), against finite differences, and its parameter dict and modes.
"""
import math

import numpy as np
import pytest
import torch

from nanograd import AdamW
from nanograd.fast import FastAdamW, linear_cross_entropy
from transformer.fast_model import FastModel
from nanograd.backend import make_rng, to_host
from transformer import book_torch
from transformer.model import Model, position_table

# float64 against the float64 torch oracle, identical weights and position table: the same
# operations in a different order (our heads run batched, torch loops over them; sums and
# matmuls reduce in different orders), so every number agrees to a few hundred ulps, far
# inside rtol 1e-9 (measured: worst relative error 2e-11, worst error 2e-15 of the
# tensor's largest entry).  A gradient entry that is a sum of cancelling terms (e.g. a Wq entry of
# ~1e-6 built from terms of ~1e-2) has no meaningful relative error: its rounding error is
# ~1e-16 of the terms, i.e. of the tensor's largest entries.  So each tensor also gets
# atol = 1e-12 * max|expected| of that tensor, a bound that is still 1000x below rtol's
# scale for the big entries and that no real bug (an O(1) relative error) can hide under.
RTOL64, ATOL64_SCALE = 1e-9, 1e-12
# float32 model against the float64 oracle: each float32 op rounds to 6e-8 relative and a
# logit or gradient passes through ~10 matmuls, LayerNorms and softmaxes per block with
# reductions of length up to 4C * B * T, so errors reach ~1e-6 of a tensor's scale
# (measured on BASE: at most 5e-7 of max|expected|).  rtol 1e-4 with atol = 1e-5 *
# max|expected| of the tensor, the latter for entries far smaller than the tensor's scale;
# a real bug is off by O(1) of the scale.
RTOL32, ATOL32_SCALE = 1e-4, 1e-5

BASE = dict(d_model=16, num_blocks=2, num_heads=2, context_length=8, dropout=0.0, max_token_value=23)


def assert_close(actual, expected, rtol, atol_scale, what):
    """|a - e| <= atol + rtol |e| elementwise, atol = atol_scale * max|e|; report the worst entry."""
    a = np.asarray(to_host(actual), dtype=np.float64)
    e = np.asarray(to_host(expected), dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    atol = atol_scale * float(np.abs(e).max()) if e.size else 0.0
    err = np.abs(a - e)
    excess = err - (atol + rtol * np.abs(e))
    if e.size and excess.max() > 0:
        worst = np.unravel_index(np.argmax(excess), e.shape)
        rel = err / np.maximum(np.abs(e), 1e-300)
        pytest.fail(f"{what}: max abs err {err.max():.3e}, max rel err {rel.max():.3e}, worst index "
                    f"{worst} ({a[worst]!r} vs {e[worst]!r}); rtol {rtol}, atol {atol:.3e}")


def oracle(model):
    """The book's torch Model in float64 with model's weights and the identical position table."""
    h = model.h_params
    pe = torch.from_numpy(position_table(h["context_length"], h["d_model"]))  # (T, C) float64
    torch_model = book_torch.Model(h, position_table=pe).double()
    host = {name: to_host(p).astype(np.float64) for name, p in model.params.items()}
    book_torch.load_numpy_params(torch_model, host)
    return torch_model.train() if model.training else torch_model.eval()


def torch_forward_backward(torch_model, x, y):
    """logits, loss and every parameter's .grad (name -> ndarray) of the oracle."""
    torch_model.zero_grad(set_to_none=True)
    logits, loss = torch_model(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in torch_model.named_parameters()}
    return logits.detach().numpy(), loss.item(), grads


def copies(grads):
    return {name: g.copy() for name, g in grads.items()}


def tokens(rng, B, T, V):
    x = rng.integers(0, V, size=(B, T))  # (B, T)
    y = rng.integers(0, V, size=(B, T))  # (B, T)
    return x, y


# (h_params overrides, B, T, id range): T < context_length, T = 1, one head, repeated ids, batch 1.
ORACLE_CASES = {
    "base": (dict(), 3, 8, None),
    "one-head-short": (dict(num_heads=1), 2, 5, None),
    "T=1": (dict(), 4, 1, None),
    "repeated-ids-batch1": (dict(num_heads=4, num_blocks=1), 1, 8, 3),  # ids from {0, 1, 2} only
    "three-blocks": (dict(num_blocks=3, d_model=8, max_token_value=5), 2, 7, None),
}


@pytest.fixture(params=["reference", "fast"])
def model_class(request, monkeypatch):
    """Model (the book's forward, returning the logits), or FastModel as train.py runs it: the
    output layer and loss fused, in chunks of 5 columns so a row spans several."""
    monkeypatch.setattr(linear_cross_entropy, "VCHUNK", 5)
    return Model if request.param == "reference" else FastModel


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_float64_matches_torch_oracle(case, model_class):
    overrides, B, T, id_range = ORACLE_CASES[case]
    h = {**BASE, **overrides}
    model = model_class(h, dtype="float64", seed=1)
    torch_model = oracle(model)
    x, y = tokens(np.random.default_rng(2), B, T, id_range or h["max_token_value"])
    logits, loss = model(x, y)
    grads = model.backward()
    t_logits, t_loss, t_grads = torch_forward_backward(torch_model, x, y)
    if model_class is Model:
        assert logits.shape == (B, T, h["max_token_value"])
        assert_close(logits, t_logits, RTOL64, ATOL64_SCALE, "logits")
    else:
        assert logits is None  # FastModel never makes them
    assert abs(loss - t_loss) <= RTOL64 * abs(t_loss), (loss, t_loss)
    assert list(grads) == list(t_grads)  # every named parameter, in torch's order
    for name in t_grads:
        assert_close(grads[name], t_grads[name], RTOL64, ATOL64_SCALE, f"d{name}")
    if id_range is not None:  # unused embedding rows get exactly zero gradient
        assert not grads["token_embedding_lookup_table.weight"][id_range:].any()


def test_float32_model_matches_float64_oracle():
    model = Model(BASE, dtype="float32", seed=3)
    assert all(p.dtype == np.float32 for p in model.params.values())
    torch_model = oracle(model)  # the float32 weights, widened exactly to float64
    x, y = tokens(np.random.default_rng(4), 3, 8, BASE["max_token_value"])
    logits, loss = model(x, y)
    grads = model.backward()
    t_logits, t_loss, t_grads = torch_forward_backward(torch_model, x, y)
    assert logits.dtype == np.float32
    assert_close(logits, t_logits, RTOL32, ATOL32_SCALE, "logits")
    assert abs(loss - t_loss) <= RTOL32 * abs(t_loss), (loss, t_loss)
    for name in t_grads:
        assert grads[name].dtype == np.float32, name
        assert_close(grads[name], t_grads[name], RTOL32, ATOL32_SCALE, f"d{name}")


@pytest.mark.parametrize("setup", ["reference", "fast", "fast-start-in-backward"])
def test_ten_adamw_steps_match_torch(setup, monkeypatch):
    """llm.c's test_gpt2: several optimizer steps, new random batches each, losses and final weights;
    on the reference path, on the fast one, and on the fast one with FastAdamW starting on the
    output layer from inside backward(), as train.py runs it."""
    monkeypatch.setattr(linear_cross_entropy, "VCHUNK", 5)
    h = {**BASE, "num_blocks": 1}
    model_class, optimizer_class = (Model, AdamW) if setup == "reference" else (FastModel, FastAdamW)
    model = model_class(h, dtype="float64", seed=5)
    torch_model = oracle(model)
    lr = 1e-2  # large enough that 10 steps move every weight well past rounding
    optimizer = optimizer_class(model.params, lr=lr)
    torch_optimizer = torch.optim.AdamW(torch_model.parameters(), lr=lr)
    if setup == "fast-start-in-backward":
        model.head_ready = optimizer.start
    start = {name: p.copy() for name, p in model.params.items()}
    rng = np.random.default_rng(6)
    losses, torch_losses = [], []
    for _ in range(10):
        x, y = tokens(rng, 2, 8, h["max_token_value"])
        losses.append(model(x, y)[1])
        optimizer.step(model.backward())
        torch_losses.append(book_torch.book_train_step(torch_model, torch_optimizer,
                                                       torch.from_numpy(x), torch.from_numpy(y)))
    np.testing.assert_allclose(losses, torch_losses, rtol=RTOL64, atol=0)
    assert losses[-1] < losses[0]  # it learned something, so the steps were real
    for name, p in torch_model.named_parameters():
        assert not np.array_equal(model.params[name], start[name]), name
        assert_close(model.params[name], p.detach().numpy(), RTOL64, ATOL64_SCALE, name)


def test_grad_accumulation_equals_one_big_batch():
    """train.py's --grad-accum-steps 2 with batch 2: the mean of two micro-batch gradients is the
    gradient of the concatenated batch of 4 (the loss is a mean over B*T equal-sized parts)."""
    model = Model(BASE, dtype="float64", seed=7)
    x, y = tokens(np.random.default_rng(8), 4, 8, BASE["max_token_value"])
    model(x, y)
    big = copies(model.backward())  # copies: the next backward() reuses the (V, C) arrays
    model(x[:2], y[:2])
    first = copies(model.backward())
    model(x[2:], y[2:])
    second = model.backward()
    # The big batch sums its 4*T rows in one matmul, the halves in two and then add: a few ulps,
    # so rtol 1e-12; atol 1e-14 of the tensor's scale for entries that are cancelling sums.
    for name in big:
        assert_close((first[name] + second[name]) / 2, big[name], 1e-12, 1e-14, f"d{name}")


# ---- finite differences ----------------------------------------------------------------------

FD_H = 1e-6  # central differences in float64: truncation ~h^2, rounding ~1e-16 * |loss| / h ~ 1e-10
FD_RTOL, FD_ATOL = 1e-6, 1e-8  # a correct gradient agrees to ~1e-9; a wrong one is off by O(1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_matches_finite_differences(dropout):
    """A few random entries of every parameter; with dropout the generator is reseeded before each
    forward, so every loss evaluation uses the same masks as the backward."""
    h = dict(d_model=8, num_blocks=2, num_heads=2, context_length=4, dropout=dropout, max_token_value=7)
    model = Model(h, dtype="float64", seed=9).train()
    x, y = tokens(np.random.default_rng(10), 2, 4, 7)
    x[0, :2] = 3  # a repeated id

    def loss():
        model.rng = make_rng(np, 11)
        return model(x, y)[1]

    loss()
    grads = copies(model.backward())
    pick = np.random.default_rng(12)
    failures = []
    for name, p in model.params.items():
        for flat in pick.choice(p.size, size=min(3, p.size), replace=False):
            i = np.unravel_index(flat, p.shape)
            old = p[i]
            p[i] = old + FD_H
            up = loss()
            p[i] = old - FD_H
            down = loss()
            p[i] = old
            numeric, analytic = (up - down) / (2 * FD_H), grads[name][i]
            if abs(analytic - numeric) > FD_ATOL + FD_RTOL * abs(numeric):
                failures.append(f"{name}{i}: analytic {analytic:.10e}, numeric {numeric:.10e}, "
                                f"abs err {abs(analytic - numeric):.3e}")
    assert not failures, "\n".join(failures)


# ---- the parameter dict ----------------------------------------------------------------------

def test_params_are_the_books_state_dict_minus_masks():
    h = {**BASE, "num_blocks": 2, "num_heads": 2}
    model = Model(h, seed=0)
    torch_model = book_torch.Model(h)
    state = torch_model.state_dict()
    assert list(model.params) == [name for name in state if not name.endswith(".mask")]
    assert list(model.params) == [name for name, _ in torch_model.named_parameters()]
    for name, p in torch_model.named_parameters():
        assert model.params[name].shape == tuple(p.shape), name
    assert model.num_params() == sum(p.numel() for p in torch_model.parameters())


def test_writing_params_in_place_changes_the_model():
    model = Model(BASE, dtype="float64", seed=13).eval()
    x, _ = tokens(np.random.default_rng(14), 2, 8, BASE["max_token_value"])
    before = model(x)[0].copy()
    model.params["model_out_linear_layer.bias"][3] += 5.0
    after = model(x)[0]
    np.testing.assert_allclose(after[..., 3], before[..., 3] + 5.0, rtol=1e-12)
    np.testing.assert_array_equal(np.delete(after, 3, axis=-1), np.delete(before, 3, axis=-1))

    # A per-head Wq is a view into the block's (3, NH, hs, C) storage: writing it must reach the
    # attention, and torch built from the edited dict must agree.
    Wq = model.params["transformer_blocks.1.mha.heads.1.Wq.weight"]
    Wq[...] = np.random.default_rng(15).standard_normal(Wq.shape)
    edited = model(x)[0]
    assert np.abs(edited - after).max() > 1e-3
    with torch.no_grad():
        expected = oracle(model)(torch.from_numpy(x))[0].numpy()
    assert_close(edited, expected, RTOL64, ATOL64_SCALE, "logits after editing Wq")


def test_untrained_loss_is_near_log_vocab():
    h = {**BASE, "num_blocks": 1, "max_token_value": 1000}
    for dtype in ("float32", "float64"):
        x, y = tokens(np.random.default_rng(16), 4, 8, 1000)
        loss = Model(h, dtype=dtype, seed=17).eval()(x, y)[1]
        assert abs(loss - math.log(1000)) < 0.5, (dtype, loss, math.log(1000))


# ---- modes, causality, limits -----------------------------------------------------------------

def test_dropout_train_mode_is_random_by_model_rng(xp):
    h = {**BASE, "dropout": 0.2}
    model = Model(h, backend=xp.__name__, dtype="float64", seed=18).train()
    x, y = tokens(np.random.default_rng(19), 2, 8, h["max_token_value"])
    first = to_host(model(x, y)[0])
    second = to_host(model(x, y)[0])  # the generator has moved on: new masks
    assert np.abs(first - second).max() > 1e-3
    model.rng = make_rng(xp, 20)
    a = to_host(model(x, y)[0])
    model.rng = make_rng(xp, 20)
    b = to_host(model(x, y)[0])
    np.testing.assert_array_equal(a, b)


def test_eval_mode_is_deterministic_and_equals_no_dropout(xp):
    x, y = tokens(np.random.default_rng(21), 2, 8, BASE["max_token_value"])
    model = Model({**BASE, "dropout": 0.5}, backend=xp.__name__, dtype="float64", seed=22).eval()
    plain = Model(BASE, backend=xp.__name__, dtype="float64", seed=22)  # same weights, dropout 0, train mode
    logits, loss = model(x, y)
    grads = model.backward()
    logits2, loss2 = model(x, y)
    np.testing.assert_array_equal(to_host(logits), to_host(logits2))
    p_logits, p_loss = plain(x, y)
    p_grads = plain.backward()
    np.testing.assert_array_equal(to_host(logits), to_host(p_logits))
    assert loss == p_loss
    for name in grads:  # bit for bit on NumPy; CuPy's scatter-add sums repeated ids in any order
        if xp is np:
            np.testing.assert_array_equal(grads[name], p_grads[name])
        else:
            assert_close(grads[name], p_grads[name], 1e-12, 1e-15, f"d{name}")
    model.train()  # and dropout really is on once back in train mode
    assert np.abs(to_host(model(x, y)[0]) - to_host(logits)).max() > 1e-3


@pytest.mark.parametrize("t0", [0, 3, 7])
def test_causal(xp, t0):
    """Changing the token at position t0 leaves every logit before t0 exactly as it was."""
    model = Model(BASE, backend=xp.__name__, dtype="float64", seed=23).eval()
    x, _ = tokens(np.random.default_rng(24), 2, 8, BASE["max_token_value"])
    before = to_host(model(x)[0])
    x2 = x.copy()
    x2[:, t0] = (x2[:, t0] + 1) % BASE["max_token_value"]
    after = to_host(model(x2)[0])
    np.testing.assert_array_equal(after[:, :t0], before[:, :t0])
    assert np.abs(after[:, t0] - before[:, t0]).min() > 0


def test_longer_than_context_length_raises(xp):
    model = Model(BASE, backend=xp.__name__, seed=0)
    x = np.zeros((1, BASE["context_length"] + 1), dtype=np.int64)
    with pytest.raises(ValueError, match="context_length"):
        model(x)
    model(x[:, :-1])  # exactly context_length is fine


def test_backward_needs_a_forward_with_targets():
    model = Model(BASE, seed=0)
    with pytest.raises(RuntimeError):
        model.backward()
    model(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(RuntimeError):
        model.backward()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backend_matches_float64_numpy_model(xp, dtype):
    """Forward and backward on xp (NumPy or CuPy) and dtype against the float64 NumPy model."""
    reference = Model(BASE, dtype="float64", seed=25)
    model = Model(BASE, backend=xp.__name__, dtype=dtype, seed=25)
    for name, p in model.params.items():  # the same weights, rounded to dtype
        reference.params[name][...] = to_host(p)
    x, y = tokens(np.random.default_rng(26), 2, 8, BASE["max_token_value"])
    logits, loss = model(x, y)
    grads = model.backward()
    r_logits, r_loss = reference(x, y)
    r_grads = reference.backward()
    assert isinstance(logits, xp.ndarray) and logits.dtype == np.dtype(dtype)
    rtol, atol_scale = (RTOL64, ATOL64_SCALE) if dtype == "float64" else (RTOL32, ATOL32_SCALE)
    assert_close(logits, r_logits, rtol, atol_scale, "logits")
    assert abs(loss - r_loss) <= rtol * abs(r_loss)
    for name in r_grads:
        assert isinstance(grads[name], xp.ndarray) and grads[name].dtype == np.dtype(dtype), name
        assert_close(grads[name], r_grads[name], rtol, atol_scale, f"d{name}")
