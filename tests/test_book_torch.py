"""Tests for transformer/book_torch.py, the PyTorch oracle of the book's ch.18 model."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from transformer.book_torch import (
    Model,
    book_train_step,
    load_numpy_params,
    numpy_params,
    position_table,
)

SMALL = dict(d_model=16, num_blocks=2, num_heads=2, context_length=8, dropout=0.1, max_token_value=50)


def make_model(seed=0, pe=None, **overrides):
    torch.manual_seed(seed)
    return Model({**SMALL, **overrides}, position_table=pe)


def expected_keys(num_blocks, num_heads):
    keys = ["token_embedding_lookup_table.weight"]
    for i in range(num_blocks):
        b = f"transformer_blocks.{i}"
        keys += [f"{b}.ln1.weight", f"{b}.ln1.bias", f"{b}.ln2.weight", f"{b}.ln2.bias"]
        for h in range(num_heads):
            hd = f"{b}.mha.heads.{h}"
            keys += [f"{hd}.Wq.weight", f"{hd}.Wk.weight", f"{hd}.Wv.weight", f"{hd}.mask"]
        keys += [f"{b}.mha.projection_layer.weight", f"{b}.mha.projection_layer.bias"]
        keys += [f"{b}.ffn.ffn.0.weight", f"{b}.ffn.ffn.0.bias"]
        keys += [f"{b}.ffn.ffn.2.weight", f"{b}.ffn.ffn.2.bias"]
    keys += [f"transformer_blocks.{num_blocks}.weight", f"transformer_blocks.{num_blocks}.bias"]
    keys += ["model_out_linear_layer.weight", "model_out_linear_layer.bias"]
    return keys


# The key list for a 2-block, 2-head model, written out in full (not generated), so a
# rename in the model cannot be mirrored by a rename in the test helper.
EXPECTED_KEYS_2x2 = {
    "token_embedding_lookup_table.weight",
    "transformer_blocks.0.ln1.weight", "transformer_blocks.0.ln1.bias",
    "transformer_blocks.0.ln2.weight", "transformer_blocks.0.ln2.bias",
    "transformer_blocks.0.mha.heads.0.Wq.weight", "transformer_blocks.0.mha.heads.0.Wk.weight",
    "transformer_blocks.0.mha.heads.0.Wv.weight", "transformer_blocks.0.mha.heads.0.mask",
    "transformer_blocks.0.mha.heads.1.Wq.weight", "transformer_blocks.0.mha.heads.1.Wk.weight",
    "transformer_blocks.0.mha.heads.1.Wv.weight", "transformer_blocks.0.mha.heads.1.mask",
    "transformer_blocks.0.mha.projection_layer.weight", "transformer_blocks.0.mha.projection_layer.bias",
    "transformer_blocks.0.ffn.ffn.0.weight", "transformer_blocks.0.ffn.ffn.0.bias",
    "transformer_blocks.0.ffn.ffn.2.weight", "transformer_blocks.0.ffn.ffn.2.bias",
    "transformer_blocks.1.ln1.weight", "transformer_blocks.1.ln1.bias",
    "transformer_blocks.1.ln2.weight", "transformer_blocks.1.ln2.bias",
    "transformer_blocks.1.mha.heads.0.Wq.weight", "transformer_blocks.1.mha.heads.0.Wk.weight",
    "transformer_blocks.1.mha.heads.0.Wv.weight", "transformer_blocks.1.mha.heads.0.mask",
    "transformer_blocks.1.mha.heads.1.Wq.weight", "transformer_blocks.1.mha.heads.1.Wk.weight",
    "transformer_blocks.1.mha.heads.1.Wv.weight", "transformer_blocks.1.mha.heads.1.mask",
    "transformer_blocks.1.mha.projection_layer.weight", "transformer_blocks.1.mha.projection_layer.bias",
    "transformer_blocks.1.ffn.ffn.0.weight", "transformer_blocks.1.ffn.ffn.0.bias",
    "transformer_blocks.1.ffn.ffn.2.weight", "transformer_blocks.1.ffn.ffn.2.bias",
    "transformer_blocks.2.weight", "transformer_blocks.2.bias",
    "model_out_linear_layer.weight", "model_out_linear_layer.bias",
}


def param_count(C, L, V):
    """Closed form from docs/model.md: embedding + L blocks + final LN + output layer."""
    return V * C + L * (12 * C * C + 10 * C) + 2 * C + (C * V + V)


def test_state_dict_keys_2_blocks_2_heads():
    sd = make_model().state_dict()
    assert set(sd) == EXPECTED_KEYS_2x2
    assert len(sd) == len(EXPECTED_KEYS_2x2)
    assert set(expected_keys(2, 2)) == EXPECTED_KEYS_2x2


def test_state_dict_shapes():
    C, V, T, hs = SMALL["d_model"], SMALL["max_token_value"], SMALL["context_length"], 8
    sd = make_model().state_dict()
    for name, t in sd.items():
        if name == "token_embedding_lookup_table.weight":
            want = (V, C)
        elif name.endswith(("Wq.weight", "Wk.weight", "Wv.weight")):
            want = (hs, C)
        elif name.endswith(".mask"):
            want = (T, T)
        elif name.endswith("projection_layer.weight"):
            want = (C, C)
        elif name.endswith("ffn.0.weight"):
            want = (4 * C, C)
        elif name.endswith("ffn.0.bias"):
            want = (4 * C,)
        elif name.endswith("ffn.2.weight"):
            want = (C, 4 * C)
        elif name == "model_out_linear_layer.weight":
            want = (V, C)
        elif name == "model_out_linear_layer.bias":
            want = (V,)
        else:  # LayerNorm weight/bias, projection bias, ffn.2 bias
            want = (C,)
        assert tuple(t.shape) == want, name


def test_masks_are_the_only_buffers_and_are_lower_triangular():
    model = make_model()
    params = {n for n, _ in model.named_parameters()}
    non_params = set(model.state_dict()) - params
    assert non_params == {k for k in EXPECTED_KEYS_2x2 if k.endswith(".mask")}
    assert len(non_params) == 4
    T = SMALL["context_length"]
    for n in non_params:
        assert torch.equal(model.state_dict()[n], torch.tril(torch.ones(T, T)))


def test_position_table_is_not_in_state_dict():
    pe = position_table(SMALL["context_length"], SMALL["d_model"], torch.float64)
    torch.manual_seed(0)
    model = Model(SMALL, position_table=pe)
    assert set(model.state_dict()) == EXPECTED_KEYS_2x2
    assert all(p is not pe for p in model.parameters())


def test_parameter_count_formula():
    for C, L, NH, V in [(16, 2, 2, 50), (24, 3, 4, 37), (80, 6, 4, 1000)]:
        torch.manual_seed(0)
        m = Model(dict(d_model=C, num_blocks=L, num_heads=NH, context_length=8, dropout=0.0, max_token_value=V))
        assert sum(p.numel() for p in m.parameters()) == param_count(C, L, V)


def test_book_config_parameter_count():
    # Book config (d_model 80, 6 blocks, 4 heads, context 128) with V = 100,000; see docs/model.md.
    assert param_count(80, 6, 100_000) == 16_565_760
    m = Model(dict(d_model=80, num_blocks=6, num_heads=4, context_length=128, dropout=0.1,
                   max_token_value=100_000))  # ~66 MB, 0.3 s (the meta device costs 1 s to warm up)
    assert sum(p.numel() for p in m.parameters()) == 16_565_760


def test_untrained_loss_is_near_ln_vocab():
    V = 1000
    model = make_model(max_token_value=V).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (4, 8), generator=g)
    y = torch.randint(0, V, (4, 8), generator=g)
    logits, loss = model(x, y)
    assert logits.shape == (4, 8, V)
    assert abs(loss.item() - math.log(V)) < 0.3
    _, no_loss = model(x)
    assert no_loss is None


def test_loss_matches_manual_cross_entropy():
    model = make_model().double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 50, (3, 5), generator=g)
    y = torch.randint(0, 50, (3, 5), generator=g)
    logits, loss = model(x, y)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    manual = -logp.gather(-1, y.unsqueeze(-1)).mean()
    assert torch.allclose(loss, manual, rtol=0, atol=1e-12)


def reference_logits(sd, idx, num_blocks, num_heads):
    """The same network written independently from a state_dict: heads batched by stacking
    their weights, torch's fused causal attention, functional LayerNorm."""
    V, C = sd["token_embedding_lookup_table.weight"].shape
    B, T = idx.shape
    hs = C // num_heads
    pe = torch.tensor([[math.sin(p / 10000 ** (i / C)) if i % 2 == 0 else math.cos(p / 10000 ** ((i - 1) / C))
                        for i in range(C)] for p in range(T)], dtype=torch.float64)  # (T, C)
    x = sd["token_embedding_lookup_table.weight"][idx] + pe  # (B, T, C)
    for i in range(num_blocks):
        b = f"transformer_blocks.{i}."
        h = F.layer_norm(x, (C,), sd[b + "ln1.weight"], sd[b + "ln1.bias"], eps=1e-5)  # (B, T, C)
        qkv = []
        for name in ("Wq", "Wk", "Wv"):
            W = torch.stack([sd[f"{b}mha.heads.{j}.{name}.weight"] for j in range(num_heads)])  # (NH, hs, C)
            qkv.append(torch.einsum("btc,nsc->bnts", h, W))  # (B, NH, T, hs)
        att = F.scaled_dot_product_attention(*qkv, is_causal=True)  # (B, NH, T, hs)
        att = att.transpose(1, 2).reshape(B, T, num_heads * hs)  # (B, T, C)
        x = x + F.linear(att, sd[b + "mha.projection_layer.weight"], sd[b + "mha.projection_layer.bias"])
        h = F.layer_norm(x, (C,), sd[b + "ln2.weight"], sd[b + "ln2.bias"], eps=1e-5)  # (B, T, C)
        h = F.relu(F.linear(h, sd[b + "ffn.ffn.0.weight"], sd[b + "ffn.ffn.0.bias"]))  # (B, T, 4C)
        x = x + F.linear(h, sd[b + "ffn.ffn.2.weight"], sd[b + "ffn.ffn.2.bias"])  # (B, T, C)
    f = f"transformer_blocks.{num_blocks}."
    x = F.layer_norm(x, (C,), sd[f + "weight"], sd[f + "bias"], eps=1e-5)  # (B, T, C)
    return F.linear(x, sd["model_out_linear_layer.weight"], sd["model_out_linear_layer.bias"])  # (B, T, V)


def test_forward_matches_independent_reference_float64():
    # The exact float64 table; the book's own path builds it in float32 (error ~1e-7).
    model = make_model(num_heads=4, pe=position_table(8, 16, torch.float64)).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so a skipped or misplaced LN shows
        for n, p in model.named_parameters():
            if ".ln" in n or n.startswith("transformer_blocks.2."):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(14))
    logits, _ = model(x)
    ref = reference_logits(model.state_dict(), x, num_blocks=2, num_heads=4)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-10)  # float64, same math, other op order


def test_causality():
    model = make_model().double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 50, (2, 8), generator=g)
    logits, _ = model(x)
    for t in range(8):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 50
        logits2, _ = model(x2)
        assert torch.equal(logits2[:, :t], logits[:, :t]), t
        assert not torch.allclose(logits2[:, t], logits[:, t])  # the changed step does move


@pytest.mark.parametrize("where", ["heads", "mha.dropout", "ffn.ffn.3"])
def test_dropout_is_active_in_train_mode_only(where):
    model = make_model()
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    # Keep only the dropouts at one site (attention weights, after projection, end of FFN).
    sites = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    kept = [n for n in sites if f".{where}." in n or n.endswith(f".{where}")]
    assert len(kept) == (4 if where == "heads" else 2) and len(sites) == 8
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and n not in kept:
            m.p = 0.0
    model.train()
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.equal(a, b)
    model.eval()
    c, _ = model(x)
    d, _ = model(x)
    assert torch.equal(c, d)


def test_generate_shape_and_range():
    model = make_model().eval()
    idx = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(5))
    # 12 new tokens from a 5-token prompt pushes past context_length 8, exercising the crop.
    out = model.generate(idx, max_new_tokens=12, temperature=0.8, top_k=10,
                         generator=torch.Generator().manual_seed(6))
    assert out.shape == (3, 17)
    assert out.dtype == torch.long
    assert torch.equal(out[:, :5], idx)
    assert int(out.min()) >= 0 and int(out.max()) < SMALL["max_token_value"]


def test_generate_top_k_1_is_greedy():
    model = make_model().double().eval()
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(7))
    out = model.generate(idx, max_new_tokens=10, top_k=1, generator=torch.Generator().manual_seed(8))
    greedy = idx
    for _ in range(10):
        logits, _ = model(greedy[:, -SMALL["context_length"]:])
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


def test_generate_top_k_restricts_support():
    model = make_model().double().eval()
    idx = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(9))
    logits, _ = model(idx)
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    g = torch.Generator().manual_seed(10)
    draws = {int(model.generate(idx, 1, temperature=5.0, top_k=3, generator=g)[0, -1]) for _ in range(60)}
    assert draws <= allowed
    assert len(draws) > 1  # with temperature 5 the three are all close: it really samples


def test_position_table_matches_formula_in_float64():
    T, C = 128, 80
    pe = position_table(T, C, torch.float64).numpy()
    ref = np.empty((T, C))
    for pos in range(T):
        for i in range(0, C, 2):
            angle = pos / 10000.0 ** (i / C)
            ref[pos, i] = math.sin(angle)
            ref[pos, i + 1] = math.cos(angle)
    np.testing.assert_allclose(pe, ref, rtol=0, atol=1e-12)  # float64 round-off at angles <= 127
    pe32 = position_table(T, C).numpy()
    assert pe32.dtype == np.float32
    np.testing.assert_allclose(pe32, ref, rtol=0, atol=2e-5)  # float32: angle error ~127 * 6e-8


def test_model_uses_given_position_table():
    torch.manual_seed(0)
    base = Model(SMALL).double().eval()
    torch.manual_seed(0)
    shared = Model(SMALL, position_table=position_table(8, 16, torch.float64)).double().eval()
    torch.manual_seed(0)
    zeros = Model(SMALL, position_table=torch.zeros(8, 16, dtype=torch.float64)).double().eval()
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(11))
    a, _ = base(x)
    b, _ = shared(x)
    c, _ = zeros(x)
    # Book path (float32 table cast up) vs exact float64 table: equal to float32 precision only.
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(b, c, atol=1e-3)
    with pytest.raises(ValueError):
        Model(SMALL, position_table=torch.zeros(7, 16))


def test_numpy_params_round_trip():
    src = make_model(seed=0).double()
    dst = make_model(seed=1).double()
    params = numpy_params(src)
    assert set(params) == {k for k in EXPECTED_KEYS_2x2 if not k.endswith(".mask")}
    assert all(isinstance(v, np.ndarray) for v in params.values())
    load_numpy_params(dst, params)
    for (n1, t1), (n2, t2) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    # The arrays are copies: editing them does not touch the model.
    params["model_out_linear_layer.bias"][:] = 123.0
    assert not torch.any(src.model_out_linear_layer.bias == 123.0)
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(12))
    assert torch.equal(src.eval()(x)[0], dst.eval()(x)[0])


def test_load_numpy_params_is_strict():
    model = make_model()
    params = numpy_params(model)
    missing = dict(params)
    del missing["transformer_blocks.0.ln1.bias"]
    with pytest.raises(KeyError):
        load_numpy_params(model, missing)
    extra = {**params, "bogus.weight": np.zeros(3)}
    with pytest.raises(KeyError):
        load_numpy_params(model, extra)
    bad = {**params, "model_out_linear_layer.bias": np.zeros(49)}
    with pytest.raises(ValueError):
        load_numpy_params(model, bad)


def test_invalid_configs_raise():
    with pytest.raises(ValueError):
        Model({**SMALL, "num_heads": 3})
    with pytest.raises(ValueError):
        Model({**SMALL, "d_model": 15, "num_heads": 1})
    with pytest.raises(ValueError):
        make_model()(torch.zeros(1, 9, dtype=torch.long))


def test_book_train_step_reduces_loss():
    model = make_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 50, (2, 8), generator=g)
    y = torch.randint(0, 50, (2, 8), generator=g)
    losses = [book_train_step(model, opt, x, y) for _ in range(30)]
    assert all(isinstance(l, float) for l in losses)
    assert losses[-1] < losses[0] - 1.0
    assert all(p.grad is not None for p in model.parameters())


def test_book_train_step_uses_fresh_gradients():
    # After a step, .grad must be the gradient at the pre-step weights, not a sum over steps.
    model = make_model(dropout=0.0).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(15)
    x = torch.randint(0, 50, (2, 8), generator=g)
    y = torch.randint(0, 50, (2, 8), generator=g)
    book_train_step(model, opt, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    twin = make_model(dropout=0.0).double()
    twin.load_state_dict(model.state_dict())
    twin(x, y)[1].backward()
    loss = book_train_step(model, opt, x, y)
    assert loss == pytest.approx(twin(x, y)[1].item(), rel=1e-12)
    for n, p in model.named_parameters():
        tp = dict(twin.named_parameters())[n]
        torch.testing.assert_close(p.grad, tp.grad, rtol=0, atol=1e-12)
        assert not torch.equal(p.detach(), before[n]), n  # every parameter moved
