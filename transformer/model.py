"""The book's ch.18 Transformer language model on nanograd kernels.

    x = embedding[idx] + positions                      (B, T, C)
    for each block:
        x = x + dropout(proj(attention(ln1(x))))
        x = x + dropout(fc2(relu(fc1(ln2(x)))))
    logits = head(ln_final(x))                          (B, T, V)
    loss = cross_entropy(logits, targets)

forward() keeps every kernel's cache; backward() walks the same steps in
reverse, block by block, calling each kernel's backward.  No autograd.
This is the reference model, the one to read; nanograd/fast/model.py runs
the same walk faster (FastModel, what train.py trains by default).
"""
import math
from typing import NamedTuple

import numpy as np

from nanograd import (attention_backward, attention_forward, cross_entropy_backward, cross_entropy_forward,
                      dropout_backward, dropout_forward, embedding_backward, embedding_forward,
                      layernorm_backward, layernorm_forward, linear_backward, linear_forward,
                      relu_backward, relu_forward)
from nanograd.backend import get_backend, make_rng

from .errors import UserError
from .validate import check_h_params


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


def validate_h_params(h_params):
    """UserError naming the first setting the model cannot be built with (transformer/validate.py)."""
    check_h_params(h_params)


def parameter_shapes(h_params):
    """name -> shape, named and laid out exactly like the book's PyTorch state_dict()."""
    C, V, NH = h_params["d_model"], h_params["max_token_value"], h_params["num_heads"]
    hs = C // NH
    shapes = {"token_embedding_lookup_table.weight": (V, C)}
    for i in range(h_params["num_blocks"]):
        blk = f"transformer_blocks.{i}."
        shapes[blk + "ln1.weight"] = shapes[blk + "ln1.bias"] = (C,)
        shapes[blk + "ln2.weight"] = shapes[blk + "ln2.bias"] = (C,)
        for h in range(NH):
            for W in ("Wq", "Wk", "Wv"):
                shapes[blk + f"mha.heads.{h}.{W}.weight"] = (hs, C)
        shapes[blk + "mha.projection_layer.weight"] = (C, C)
        shapes[blk + "mha.projection_layer.bias"] = (C,)
        shapes[blk + "ffn.ffn.0.weight"] = (4 * C, C)
        shapes[blk + "ffn.ffn.0.bias"] = (4 * C,)
        shapes[blk + "ffn.ffn.2.weight"] = (C, 4 * C)
        shapes[blk + "ffn.ffn.2.bias"] = (C,)
    final = f"transformer_blocks.{h_params['num_blocks']}."
    shapes[final + "weight"] = shapes[final + "bias"] = (C,)
    shapes["model_out_linear_layer.weight"] = (V, C)
    shapes["model_out_linear_layer.bias"] = (V,)
    return shapes


def init_params(h_params, seed=0):
    """PyTorch's default initialisation, drawn on the host in float64.

    Embedding ~ N(0, 1); Linear weight and bias ~ U(-1/sqrt(in), 1/sqrt(in));
    LayerNorm weight 1, bias 0.  So untrained logits are small and the loss
    starts near ln(V).
    """
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(h_params)
    final_ln = f"transformer_blocks.{h_params['num_blocks']}."
    params = {}
    for name, shape in shapes.items():
        if name.startswith("token_embedding"):
            params[name] = rng.standard_normal(shape)
        elif ".ln" in name or name.startswith(final_ln):
            params[name] = np.full(shape, 1.0 if name.endswith("weight") else 0.0)
        else:  # a Linear's weight (out, in) or bias (out,): bound from the layer's fan-in
            fan_in = shapes[name.rsplit(".", 1)[0] + ".weight"][1]
            params[name] = rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), size=shape)
    return params


# The book's state_dict keys, bound once to readable names.  Outside the blocks:
EMBEDDING = "token_embedding_lookup_table.weight"     # (V, C)
HEAD_W, HEAD_B = "model_out_linear_layer.weight", "model_out_linear_layer.bias"  # (V, C), (V,)
# The final LayerNorm is the last entry of the book's nn.Sequential of blocks:
# transformer_blocks.{num_blocks}.weight and .bias.
# Inside block i, after the prefix transformer_blocks.{i}.:
BLOCK_KEYS = {
    "ln1_w": "ln1.weight", "ln1_b": "ln1.bias",
    "proj_W": "mha.projection_layer.weight", "proj_b": "mha.projection_layer.bias",
    "ln2_w": "ln2.weight", "ln2_b": "ln2.bias",
    # The book's feed-forward is nn.Sequential(Linear(C, 4C), ReLU(), Linear(4C, C), Dropout()),
    # so its keys count those four: ffn.ffn.0 is the first linear layer (fc1 here), ffn.ffn.2 the
    # second (fc2); the ReLU (1) and the Dropout (3) have no parameters.
    "fc1_W": "ffn.ffn.0.weight", "fc1_b": "ffn.ffn.0.bias",
    "fc2_W": "ffn.ffn.2.weight", "fc2_b": "ffn.ffn.2.bias",
}
# The attention's weights are one bias-free nn.Linear(C, hs) per head and per role,
# mha.heads.{h}.Wq.weight (hs, C) and likewise Wk, Wv; here each role's heads are stacked
# as one (NH, hs, C) array, so attention runs all heads at once.
HEAD_ROLES = ("Wq", "Wk", "Wv")


class BlockParams(NamedTuple):
    """One block's parameters (or their gradients), in the order the forward uses them."""
    ln1_w: object   # (C,)
    ln1_b: object   # (C,)
    Wq: object      # (NH, hs, C)
    Wk: object      # (NH, hs, C)
    Wv: object      # (NH, hs, C)
    proj_W: object  # (C, C)
    proj_b: object  # (C,)
    ln2_w: object   # (C,)
    ln2_b: object   # (C,)
    fc1_W: object   # (4C, C)
    fc1_b: object   # (4C,)
    fc2_W: object   # (C, 4C)
    fc2_b: object   # (C,)


def block_names(i, NH):
    """BlockParams field -> the book's key (or, for Wq/Wk/Wv, the NH per-head keys) in block i."""
    prefix = f"transformer_blocks.{i}."
    names = {field: prefix + key for field, key in BLOCK_KEYS.items()}
    for role in HEAD_ROLES:
        names[role] = [prefix + f"mha.heads.{h}.{role}.weight" for h in range(NH)]
    return names


class BlockCache(NamedTuple):
    ln1: object
    attn: object
    proj: object
    drop1: object
    ln2: object
    fc1: object
    relu: object
    fc2: object
    drop2: object


class ForwardCache(NamedTuple):
    emb: object
    blocks: list
    ln_final: object
    head: object
    loss: object  # None when forward had no targets


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

    def __init__(self, h_params, backend="numpy", dtype="float32", seed=0):
        validate_h_params(h_params)
        self.h_params = dict(h_params)
        self.xp = xp = get_backend(backend)
        self.backend = backend
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise UserError(f"dtype must be float32 or float64, got {dtype!r}.")
        C, NB, NH = h_params["d_model"], h_params["num_blocks"], h_params["num_heads"]
        self.context_length = h_params["context_length"]
        self.dropout = float(h_params.get("dropout", 0.0))
        self.training = True
        self.rng = make_rng(xp, seed, 1)
        self.positions = xp.asarray(position_table(self.context_length, C), dtype=self.dtype)  # (T, C)
        init = init_params(h_params, seed)
        self.params = {name: xp.asarray(value, dtype=self.dtype) for name, value in init.items()}
        self.blocks = []
        for i in range(NB):
            names = block_names(i, NH)
            fields = {}
            for field, name in names.items():
                if field in HEAD_ROLES:  # stack the heads, and make params' entries views of the stack
                    fields[field] = xp.stack([self.params[n] for n in name])  # (NH, hs, C)
                    for h, n in enumerate(name):
                        self.params[n] = fields[field][h]
                else:
                    fields[field] = self.params[name]
            self.blocks.append(BlockParams(**fields))
        self.embedding = self.params[EMBEDDING]
        self.final_ln_w = self.params[f"transformer_blocks.{NB}.weight"]
        self.final_ln_b = self.params[f"transformer_blocks.{NB}.bias"]
        self.head_W, self.head_b = self.params[HEAD_W], self.params[HEAD_B]
        self.cache = None

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

    # ---- forward ----------------------------------------------------------
    def __call__(self, idx, targets=None):
        """(B, T) ids [, (B, T) targets] -> logits (B, T, V), loss (float, or None without targets)."""
        idx = self.xp.asarray(idx)
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        x, emb = embedding_forward(idx, self.embedding)  # (B, T, C)
        x = x + self.positions[:T]  # (B, T, C) the table is a constant: no gradient
        blocks = []
        for blk in self.blocks:
            x, block = self.block_forward(x, blk)  # (B, T, C)
            blocks.append(block)
        x, ln_final = layernorm_forward(x, self.final_ln_w, self.final_ln_b)  # (B, T, C)
        logits, head = linear_forward(x, self.head_W, self.head_b)  # (B, T, V)
        loss = loss_cache = None
        if targets is not None:
            targets = self.xp.asarray(targets).reshape(B * T)  # (B*T,)
            loss, loss_cache = cross_entropy_forward(logits.reshape(B * T, -1), targets)
        self.cache = ForwardCache(emb, blocks, ln_final, head, loss_cache)
        return logits, None if loss is None else float(loss)

    forward = __call__

    def block_forward(self, x, blk):
        """One block, the book's TransformerBlock: x (B, T, C) -> x (B, T, C), BlockCache."""
        p, rng, train = self.dropout, self.rng, self.training
        # x = x + dropout(proj(attention(ln1(x))))
        h, ln1 = layernorm_forward(x, blk.ln1_w, blk.ln1_b)  # (B, T, C)
        h, attn = attention_forward(h, blk.Wq, blk.Wk, blk.Wv, p, rng, train)  # (B, T, C)
        h, proj = linear_forward(h, blk.proj_W, blk.proj_b)  # (B, T, C)
        h, drop1 = dropout_forward(h, p, rng, train)  # (B, T, C)
        x = x + h  # (B, T, C)
        # x = x + dropout(fc2(relu(fc1(ln2(x)))))
        h, ln2 = layernorm_forward(x, blk.ln2_w, blk.ln2_b)  # (B, T, C)
        h, fc1 = linear_forward(h, blk.fc1_W, blk.fc1_b)  # (B, T, 4C)
        h, relu = relu_forward(h)  # (B, T, 4C)
        h, fc2 = linear_forward(h, blk.fc2_W, blk.fc2_b)  # (B, T, C)
        h, drop2 = dropout_forward(h, p, rng, train)  # (B, T, C)
        x = x + h  # (B, T, C)
        return x, BlockCache(ln1, attn, proj, drop1, ln2, fc1, relu, fc2, drop2)

    # ---- backward ---------------------------------------------------------
    def backward(self):
        """Gradients of the last forward's mean loss: a dict keyed like params.

        The forward read in reverse: loss, output layer, final LayerNorm, the
        blocks from last to first, the embedding.
        """
        cache = self.cache
        if cache is None or cache.loss is None:
            raise RuntimeError("backward() needs a forward with targets first")
        B, T, _ = cache.ln_final.x.shape
        dlogits = cross_entropy_backward(1.0, cache.loss)  # (B*T, V)
        dx, dhead_W, dhead_b = linear_backward(dlogits.reshape(B, T, -1), cache.head)  # (B, T, C)
        dx, dfinal_ln_w, dfinal_ln_b = layernorm_backward(dx, cache.ln_final)  # (B, T, C)
        dblocks = [None] * len(self.blocks)
        for i in reversed(range(len(self.blocks))):
            dx, dblocks[i] = self.block_backward(dx, cache.blocks[i])  # (B, T, C)
        # x = embedding[idx] + positions: the positions are constant
        dembedding = embedding_backward(dx, cache.emb)  # (V, C)
        return self.named_grads(dembedding, dblocks, dfinal_ln_w, dfinal_ln_b, dhead_W, dhead_b)

    def block_backward(self, dx, c):
        """One block's forward read in reverse: dx (B, T, C) -> dx (B, T, C), BlockParams of gradients.

        The residual stream x fed both the branch and the sum, so the
        branch's gradient is added to dx with an explicit +=.
        """
        # x = x + dropout(fc2(relu(fc1(ln2(x)))))
        dh = dropout_backward(dx, c.drop2)  # (B, T, C)
        dh, dfc2_W, dfc2_b = linear_backward(dh, c.fc2)  # (B, T, 4C)
        dh = relu_backward(dh, c.relu)  # (B, T, 4C)
        dh, dfc1_W, dfc1_b = linear_backward(dh, c.fc1)  # (B, T, C)
        dh, dln2_w, dln2_b = layernorm_backward(dh, c.ln2)  # (B, T, C)
        dx += dh  # x reached the output directly and through the branch
        # x = x + dropout(proj(attention(ln1(x))))
        dh = dropout_backward(dx, c.drop1)  # (B, T, C)
        dh, dproj_W, dproj_b = linear_backward(dh, c.proj)  # (B, T, C)
        dh, dWq, dWk, dWv = attention_backward(dh, c.attn)  # (B, T, C), (NH, hs, C) x 3
        dh, dln1_w, dln1_b = layernorm_backward(dh, c.ln1)  # (B, T, C)
        dx += dh
        return dx, BlockParams(dln1_w, dln1_b, dWq, dWk, dWv, dproj_W, dproj_b,
                               dln2_w, dln2_b, dfc1_W, dfc1_b, dfc2_W, dfc2_b)

    def named_grads(self, dembedding, dblocks, dfinal_ln_w, dfinal_ln_b, dhead_W, dhead_b):
        """The gradients under the book's keys, in params' order (per-head views of dWq, dWk, dWv)."""
        NB, NH = len(self.blocks), self.h_params["num_heads"]
        grads = {EMBEDDING: dembedding, HEAD_W: dhead_W, HEAD_B: dhead_b,
                 f"transformer_blocks.{NB}.weight": dfinal_ln_w, f"transformer_blocks.{NB}.bias": dfinal_ln_b}
        for i, dblk in enumerate(dblocks):
            for field, name in block_names(i, NH).items():
                if field in HEAD_ROLES:
                    grads.update(zip(name, getattr(dblk, field)))  # (hs, C) per head
                else:
                    grads[name] = getattr(dblk, field)
        return {name: grads[name] for name in self.params}

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
