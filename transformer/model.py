"""The book's ch.18 Transformer language model on nanograd kernels.

    x = embedding[idx] + positions                      (B, T, C)
    for each block (nanograd/block.py):
        x = x + dropout(proj(attention(ln1(x))))
        x = x + dropout(fc2(relu(fc1(ln2(x)))))
    logits = head(ln_final(x))                          (B, T, V)
    loss = cross_entropy(logits, targets)

forward() keeps every kernel's cache; backward() walks the same steps in
reverse, block by block, calling each kernel's backward.  No autograd.
This is the reference model, the one to read.  transformer/fast_model.py's
FastModel (what train.py trains by default) walks this same code and only
plugs in faster pieces: its own kernel table, head_forward/head_backward.
The book's state_dict() keys and init live in transformer/params.py.
"""
import math
from typing import NamedTuple

import numpy as np

from nanograd import cross_entropy_backward, cross_entropy_forward
from nanograd.backend import get_backend, make_rng
from nanograd.block import PLAIN_KERNELS

from .errors import UserError
from .params import HEAD_B, HEAD_W, EMBEDDING, bind_blocks, init_params, named_grads, parameter_shapes  # noqa: F401
from .validate import check_h_params


class ForwardCache(NamedTuple):
    emb: object       # EmbeddingCache
    blocks: object    # blocks_forward's cache: a BlockCache per block (batch_split: a list per share)
    ln_final: object  # LayerNormCache
    head: object      # head_forward's cache


class Model:
    """The book's Model(h_params), on NumPy or CuPy.

    params: name -> array, keyed and shaped like the book's state_dict()
    (without the mask buffers).  The arrays are the model's own storage:
    writing into them in place changes the model.  The same arrays are
    bound to readable names: self.embedding, self.blocks[i].fc1_W, ...,
    self.final_ln_w, self.head_W.  The per-head Wq/Wk/Wv of params are
    views into each block's stacked (NH, hs, C) arrays.

    model.rng is the dropout generator; train.py reseeds it every step.
    """
    kernels = PLAIN_KERNELS  # the kernels the walk calls: nanograd's own (FastModel swaps in twins)

    def __init__(self, h_params, backend="numpy", dtype="float32", seed=0):
        check_h_params(h_params)
        self.h_params = dict(h_params)
        self.xp = xp = get_backend(backend)
        self.backend = backend
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise UserError(f"dtype must be float32 or float64, got {dtype!r}.")
        self.context_length = h_params["context_length"]
        self.dropout = float(h_params.get("dropout", 0.0))
        self.training = True
        self.rng = make_rng(xp, seed, 1)
        self.positions = xp.asarray(position_table(self.context_length, h_params["d_model"]),
                                    dtype=self.dtype)  # (T, C)
        init = init_params(h_params, seed)
        self.params = {name: xp.asarray(value, dtype=self.dtype) for name, value in init.items()}
        self.blocks = bind_blocks(self.params, h_params["num_blocks"], h_params["num_heads"], xp)  # BlockParams each
        NB = h_params["num_blocks"]
        self.embedding = self.params[EMBEDDING]  # (V, C)
        self.final_ln_w = self.params[f"transformer_blocks.{NB}.weight"]  # (C,)
        self.final_ln_b = self.params[f"transformer_blocks.{NB}.bias"]  # (C,)
        self.head_W, self.head_b = self.params[HEAD_W], self.params[HEAD_B]  # (V, C), (V,)
        self.cache = None

    # ---- forward ----------------------------------------------------------
    def __call__(self, idx, targets=None):
        """(B, T) ids [, (B, T) targets] -> logits (B, T, V), loss (float, or None without targets)."""
        k = self.kernels
        idx = self.xp.asarray(idx)
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        x, emb = k.embedding_forward(idx, self.embedding)  # (B, T, C)
        x = x + self.positions[:T]  # (B, T, C) the table is a constant: no gradient
        x, blocks = k.blocks_forward(x, self.blocks, self.dropout, self.rng, self.training, k)  # (B, T, C), BlockCaches
        x, ln_final = k.layernorm_forward(x, self.final_ln_w, self.final_ln_b)  # (B, T, C)
        logits, loss, head = self.head_forward(x, targets)  # (B, T, V), float or None
        self.cache = ForwardCache(emb, blocks, ln_final, head)
        return logits, loss

    forward = __call__

    def head_forward(self, x, targets):
        """The output layer, then the loss if there are targets: logits (B, T, V), loss, cache."""
        logits, linear = self.kernels.linear_forward(x, self.head_W, self.head_b)  # (B, T, V)
        if targets is None:
            return logits, None, (linear, None)
        B, T, V = logits.shape
        targets = self.xp.asarray(targets).reshape(B * T)  # (B*T,)
        loss, loss_cache = cross_entropy_forward(logits.reshape(B * T, V), targets)
        return logits, float(loss), (linear, loss_cache)

    # ---- backward ---------------------------------------------------------
    def backward(self):
        """Gradients of the last forward's mean loss: a dict keyed like params.

        The forward read in reverse: loss and output layer, final LayerNorm,
        the blocks from last to first, the embedding.  docs/model.md draws it.
        """
        k, cache = self.kernels, self.cache
        if cache is None or cache.head[1] is None:
            raise RuntimeError("backward() needs a forward with targets first")
        dx, dhead_W, dhead_b = self.head_backward(cache.head)  # (B, T, C), (V, C), (V,)
        dx, dfinal_ln_w, dfinal_ln_b = k.layernorm_backward(dx, cache.ln_final)  # (B, T, C)
        dx, dblocks = k.blocks_backward(dx, cache.blocks)  # (B, T, C), a BlockParams per block
        # x = embedding[idx] + positions: the positions are constant, so only the embedding learns
        dembedding = k.embedding_backward(dx, cache.emb)  # (V, C)
        return named_grads(self.params, dembedding, dblocks, dfinal_ln_w, dfinal_ln_b, dhead_W, dhead_b,
                           self.h_params["num_heads"])

    def head_backward(self, head):
        """loss = cross_entropy(x @ head_W.T + head_b): (dx (B, T, C), dhead_W, dhead_b)."""
        linear, loss_cache = head
        B, T, _ = linear.x.shape
        dlogits = cross_entropy_backward(1.0, loss_cache)  # (B*T, V) d(mean loss) / d logits
        return self.kernels.linear_backward(dlogits.reshape(B, T, -1), linear)  # (B, T, C), (V, C), (V,)

    # ---- modes ------------------------------------------------------------
    def train(self):
        """Dropout on."""
        self.training = True
        return self

    def eval(self):
        """Dropout off (the book's model.eval())."""
        self.training = False
        return self

    def num_params(self):
        return sum(int(p.size) for p in self.params.values())

    # ---- generation -------------------------------------------------------
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, rng=None, kv_cache=True, stop=None):
        """Append max_new_tokens sampled ids to idx (B, T); returns host int64 (B, T + new).

        The book's ch.20 loop (crop to context_length, last position's
        logits / temperature, optional top-k, softmax, sample), with top-p,
        a repetition penalty and a key/value cache; see transformer/generate.py.
        """
        from .generate import generate
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p,
                        repetition_penalty, rng, kv_cache, stop)


def position_table(context_length, d_model):
    """The fixed sinusoidal table (context_length, d_model), in float64.

    pe[t, 2i] = sin(t / 10000^(2i/d_model)),  pe[t, 2i+1] = cos(same angle).
    A constant: added to the embeddings, never trained.
    """
    position = np.arange(context_length)[:, None]  # (T, 1)
    inv_freq = np.exp(np.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))  # (C/2,)
    pe = np.zeros((context_length, d_model))  # (T, C)
    pe[:, 0::2] = np.sin(position * inv_freq)
    pe[:, 1::2] = np.cos(position * inv_freq)[:, : d_model // 2]
    return pe
