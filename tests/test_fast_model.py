"""Tests for transformer/fast_model.py: FastModel computes what Model computes.

The whole-model torch oracle and the 10-step AdamW trajectory run on both
models in test_model.py; here FastModel is held to Model directly, and its
own machinery (head_ready, kept buffers) is pinned down.
"""
import numpy as np
import pytest

from nanograd.backend import make_rng, to_host
from nanograd.embedding import embedding_backward, embedding_forward
from nanograd.fast import linear_cross_entropy
from transformer.fast_model import FastModel
from transformer.model import Model

H = dict(d_model=16, num_blocks=2, num_heads=2, context_length=8, dropout=0.1, max_token_value=23)
# float64, the same kernels but the output layer and loss: FastModel sums the
# softmax over vocabulary chunks in another order, ~1e-16 relative per sum.
RTOL, ATOL = 1e-11, 1e-13


def batch(seed, B=3, T=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, H["max_token_value"], (B, T)), rng.integers(0, H["max_token_value"], (B, T))


@pytest.mark.parametrize("vchunk", [3, 4096], ids=["many-chunks", "one-chunk"])
def test_fast_model_equals_model_with_dropout(monkeypatch, vchunk):
    """The same loss and every gradient, dropout on (both draw the same masks from model.rng)."""
    monkeypatch.setattr(linear_cross_entropy, "VCHUNK", vchunk)
    plain, fast = Model(H, dtype="float64", seed=4), FastModel(H, dtype="float64", seed=4)
    for step in range(2):
        x, y = batch(step)
        plain.rng, fast.rng = make_rng(np, 9, step), make_rng(np, 9, step)
        plain_loss, fast_loss = plain(x, y)[1], fast(x, y)[1]
        assert fast_loss == pytest.approx(plain_loss, rel=RTOL)
        plain_grads, fast_grads = plain.backward(), fast.backward()
        assert list(fast_grads) == list(plain_grads)
        for name, g in plain_grads.items():
            np.testing.assert_allclose(fast_grads[name], g, rtol=RTOL, atol=ATOL, err_msg=name)


def test_without_targets_it_is_models_forward():
    plain, fast = Model(H, dtype="float64", seed=4).eval(), FastModel(H, dtype="float64", seed=4).eval()
    x, _ = batch(1)
    # the blocks' threaded kernels (cpu_kernels.py) sum in another order: equal to rounding
    np.testing.assert_allclose(fast(x)[0], plain(x)[0], rtol=RTOL, atol=ATOL)
    assert fast(x)[1] is None


def test_with_targets_no_logits_are_made():
    x, y = batch(2)
    logits, loss = FastModel(H, seed=1)(x, y)
    assert logits is None and np.isfinite(loss)


def test_head_ready_gets_the_output_layers_final_gradients_once():
    model = FastModel(H, dtype="float64", seed=3)
    x, y = batch(4)
    model(x, y)
    calls = []
    model.head_ready = lambda head: calls.append({name: g.copy() for name, g in head.items()})
    grads = model.backward()
    assert len(calls) == 1
    head = calls[0]
    assert sorted(head) == ["model_out_linear_layer.bias", "model_out_linear_layer.weight"]
    for name, g in head.items():
        np.testing.assert_array_equal(g, grads[name], err_msg=name)


def test_output_layer_and_embedding_gradients_live_in_kept_buffers():
    """The (V, C) gradients are the same arrays every backward (overwritten, like torch's .grad);
    the second step's values are its own, not the first's added in."""
    model = FastModel(H, dtype="float64", seed=3)
    first_batch, second_batch = batch(5), batch(6)
    model(*first_batch)
    first = model.backward()
    kept = {name: first[name] for name in ("model_out_linear_layer.weight", "token_embedding_lookup_table.weight")}
    model.rng = make_rng(np, 7)
    model(*second_batch)
    second = model.backward()
    fresh = FastModel(H, dtype="float64", seed=3)
    fresh.rng = make_rng(np, 7)  # the same dropout masks
    fresh(*second_batch)
    expected = fresh.backward()
    for name, array in kept.items():
        assert second[name] is array, name
        np.testing.assert_array_equal(second[name], expected[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_embedding_backward_into_equals_embedding_backward(xp, dtype):
    """Stale values in the buffer are cleared and repeated ids still accumulate."""
    rng = np.random.default_rng(3)
    idx = xp.asarray(np.array([[1, 1, 4, 0], [4, 1, 2, 2], [0, 0, 0, 3]]))  # (B, T) repeats on purpose
    _, cache = embedding_forward(idx, xp.asarray(rng.standard_normal((5, 2)).astype(dtype)))
    dout = xp.asarray(rng.standard_normal((3, 4, 2)).astype(dtype))  # (B, T, C)
    model = FastModel(dict(d_model=2, num_blocks=1, num_heads=1, context_length=4, max_token_value=5),
                      backend="numpy" if xp is np else "cupy", dtype=dtype)
    buffer = model.buffers["dembedding"] = xp.full((5, 2), 123.0, dtype=dtype)  # (V, C) stale contents
    dW = model.embedding_backward_into(dout, cache)
    assert dW is buffer
    if xp is np:
        np.testing.assert_array_equal(to_host(dW), to_host(embedding_backward(dout, cache)))
    else:  # cupyx.scatter_add's atomics add a repeated id's rows in no fixed order: equal to rounding
        tol = {"float64": 1e-12, "float32": 1e-5}[dtype] * float(np.abs(to_host(dout)).sum())
        np.testing.assert_allclose(to_host(dW), to_host(embedding_backward(dout, cache)), rtol=0, atol=tol)
