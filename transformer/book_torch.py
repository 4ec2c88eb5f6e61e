"""The book's ch.18 model in PyTorch: the oracle for the hand-written NumPy model.

This follows Wayland Zhang, "Transformer Architecture", ch.18 `model.py`
(with `generate` as in ch.20 and the training step of ch.19) layer for layer,
with the same attribute names, so that `state_dict()` keys match the book's
checkpoints and the NumPy parameter dict:

    token_embedding_lookup_table.weight                  (V, C)
    transformer_blocks.{i}.ln1.weight|bias               (C,)
    transformer_blocks.{i}.mha.heads.{h}.Wq|Wk|Wv.weight (hs, C)
    transformer_blocks.{i}.mha.heads.{h}.mask            (context_length, context_length) buffer
    transformer_blocks.{i}.mha.projection_layer.weight   (C, C)   .bias (C,)
    transformer_blocks.{i}.ln2.weight|bias               (C,)
    transformer_blocks.{i}.ffn.ffn.0.weight              (4C, C)  .bias (4C,)
    transformer_blocks.{i}.ffn.ffn.2.weight              (C, 4C)  .bias (C,)
    transformer_blocks.{num_blocks}.weight|bias          (C,)     final LayerNorm
    model_out_linear_layer.weight                        (V, C)   .bias (V,)

Torch is used here only as a test oracle, for benchmarks and for checkpoint
interop; nothing in the NumPy model imports this file.

Differences from the book, none of which change the numbers:
- `h_params['device']` is ignored; the position table is built on the
  device of `idx`.
- An optional `position_table` tensor may be passed to the constructor (the
  float64 oracle shares the NumPy model's exact table). It is a plain
  attribute, not a buffer, so it never appears in `state_dict()`.
- `generate` runs under `torch.no_grad()` (the book's inference.py wraps the
  call in it) and accepts an optional `generator` for reproducible sampling.
- Odd `d_model`, `d_model` not divisible by `num_heads`, and sequences longer
  than `context_length` raise a ValueError instead of a shape error.
"""
import math

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


def position_table(context_length, d_model, dtype=torch.float32, device=None):
    """Sinusoidal position table, computed in `dtype` exactly as the book does.

    pe[pos, 2i] = sin(pos * div[i]), pe[pos, 2i+1] = cos(pos * div[i]),
    div[i] = exp(2i * (-ln(10000) / d_model)).
    """
    if d_model % 2 != 0:
        raise ValueError(f"d_model must be even for the sinusoidal table, got {d_model}")
    pe = torch.zeros(context_length, d_model, dtype=dtype, device=device)  # (T, C)
    position = torch.arange(0, context_length, dtype=dtype, device=device).unsqueeze(1)  # (T, 1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=dtype, device=device) * (-math.log(10000.0) / d_model)
    )  # (C/2,)
    pe[:, 0::2] = torch.sin(position * div_term)  # (T, C/2)
    pe[:, 1::2] = torch.cos(position * div_term)  # (T, C/2)
    return pe


class FeedForwardNetwork(nn.Module):
    def __init__(self, d_model, dropout):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_model * 4),
            nn.ReLU(),
            nn.Linear(d_model * 4, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.ffn(x)  # (B, T, C)


class Attention(nn.Module):
    """One causal self-attention head."""

    def __init__(self, d_model, head_size, context_length, dropout):
        super().__init__()
        self.head_size = head_size
        self.Wq = nn.Linear(d_model, head_size, bias=False)
        self.Wk = nn.Linear(d_model, head_size, bias=False)
        self.Wv = nn.Linear(d_model, head_size, bias=False)
        self.register_buffer("mask", torch.tril(torch.ones(context_length, context_length)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q = self.Wq(x)  # (B, T, hs)
        k = self.Wk(x)  # (B, T, hs)
        v = self.Wv(x)  # (B, T, hs)
        weights = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, T, T)
        weights = weights.masked_fill(self.mask[:T, :T] == 0, float("-inf"))  # (B, T, T)
        weights = F.softmax(weights, dim=-1)  # (B, T, T)
        weights = self.dropout(weights)  # (B, T, T)
        return weights @ v  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads, head_size, context_length, dropout):
        super().__init__()
        self.heads = nn.ModuleList(
            [Attention(d_model, head_size, context_length, dropout) for _ in range(num_heads)]
        )
        self.projection_layer = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        head_outputs = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, NH*hs) = (B, T, C)
        return self.dropout(self.projection_layer(head_outputs))  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, d_model, num_heads, head_size, context_length, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mha = MultiHeadAttention(d_model, num_heads, head_size, context_length, dropout)
        self.ffn = FeedForwardNetwork(d_model, dropout)

    def forward(self, x):
        x = x + self.mha(self.ln1(x))  # (B, T, C)
        x = x + self.ffn(self.ln2(x))  # (B, T, C)
        return x


class Model(nn.Module):
    def __init__(self, h_params, position_table=None):
        super().__init__()
        self.context_length = h_params["context_length"]
        self.d_model = h_params["d_model"]
        self.num_blocks = h_params["num_blocks"]
        self.num_heads = h_params["num_heads"]
        self.head_size = self.d_model // self.num_heads
        self.dropout = h_params["dropout"]
        self.max_token_value = h_params["max_token_value"]
        if self.d_model % 2 != 0:
            raise ValueError(f"d_model must be even (sinusoidal table), got {self.d_model}")
        if self.head_size * self.num_heads != self.d_model:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if position_table is not None:
            expected = (self.context_length, self.d_model)
            if tuple(position_table.shape) != expected:
                raise ValueError(
                    f"position_table has shape {tuple(position_table.shape)}, expected {expected}"
                )
        # A plain attribute, not a buffer: the table is a constant, not part of state_dict().
        self.position_table = position_table

        self.token_embedding_lookup_table = nn.Embedding(self.max_token_value, self.d_model)
        self.transformer_blocks = nn.Sequential(
            *(
                [
                    TransformerBlock(
                        self.d_model, self.num_heads, self.head_size, self.context_length, self.dropout
                    )
                    for _ in range(self.num_blocks)
                ]
                + [nn.LayerNorm(self.d_model)]
            )
        )
        self.model_out_linear_layer = nn.Linear(self.d_model, self.max_token_value)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        tok = self.token_embedding_lookup_table(idx)  # (B, T, C)
        if self.position_table is not None:
            pe = self.position_table.to(dtype=tok.dtype, device=tok.device)  # (context_length, C)
        else:
            # The book builds the table in float32 on every call.
            pe = position_table(self.context_length, self.d_model, torch.float32, tok.device)
            pe = pe.to(tok.dtype)  # (context_length, C)
        x = tok + pe[:T, :]  # (B, T, C)
        x = self.transformer_blocks(x)  # (B, T, C)
        logits = self.model_out_linear_layer(x)  # (B, T, V)

        if targets is not None:
            B, T, V = logits.shape
            loss = F.cross_entropy(logits.view(B * T, V), targets.view(B * T))
        else:
            loss = None
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens=100, temperature=1.0, top_k=None, *, generator=None):
        """Sample `max_new_tokens` ids after `idx` (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            idx_crop = idx[:, -self.context_length:]  # (B, <=context_length)
            logits, _ = self(idx_crop)
            logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        return idx


def _mask_keys(model):
    return {name for name, _ in model.named_buffers() if name.endswith(".mask")}


def numpy_params(model):
    """state_dict() minus the causal-mask buffers, as NumPy arrays (copies, PyTorch layouts)."""
    masks = _mask_keys(model)
    return {
        name: t.detach().cpu().numpy().copy()
        for name, t in model.state_dict().items()
        if name not in masks
    }


def load_numpy_params(model, params):
    """Copy `params` (name -> ndarray, PyTorch layouts) into the model's parameters.

    Strict: the key set must equal the model's parameter names and every shape
    must match; values are cast to each parameter's dtype.
    """
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(params))
    unexpected = sorted(set(params) - set(named))
    if missing or unexpected:
        raise KeyError(f"load_numpy_params: missing {missing}, unexpected {unexpected}")
    for name, p in named.items():
        arr = np.asarray(params[name])
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(
                f"load_numpy_params: {name} has shape {arr.shape}, expected {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.as_tensor(np.asarray(params[name])))
    return model


def book_train_step(model, optimizer, x, y):
    """One step of the book's ch.19 loop; returns the loss as a Python float."""
    logits, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()
