"""The book's ch.18 Transformer language model on nanograd kernels.

    x = embedding[idx] + positions                      (B, T, C)
    for each block:
        x = x + dropout(proj(attention(ln1(x))))
        x = x + dropout(W2 relu(W1 ln2(x) + b1) + b2)
    logits = head(ln_final(x))                          (B, T, V)
    loss = cross_entropy(logits, targets)

forward() keeps every kernel's cache; backward() walks the same steps in
reverse, block by block, calling each kernel's backward.  No autograd.
"""
import math
from typing import NamedTuple

import numpy as np

from nanograd import (attention_backward, attention_forward, dropout_backward, dropout_forward,
                      embedding_backward, embedding_forward, layernorm_backward,
                      layernorm_forward, linear_backward, linear_forward, relu_backward,
                      relu_forward)
from nanograd.backend import get_backend, make_rng
from nanograd.cross_entropy import cross_entropy_backward, cross_entropy_forward
from nanograd.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward

from .errors import UserError


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
    """UserError naming the first setting the model cannot be built with."""
    for key in ("d_model", "num_blocks", "num_heads", "context_length", "max_token_value"):
        if key not in h_params:
            raise UserError(f"h_params lacks {key!r}; the model cannot be built without it.")
        value = h_params[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise UserError(f"{key} must be a positive integer, got {value!r}.")
    if h_params["d_model"] % h_params["num_heads"]:
        raise UserError(f"d_model ({h_params['d_model']}) must be divisible by num_heads "
                        f"({h_params['num_heads']}); each head gets d_model // num_heads channels.")
    dropout = h_params.get("dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must lie in [0, 1), got {dropout!r}.")


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
    head: object  # None when the output layer and the loss ran fused (return_logits False)
    loss: object  # None when forward had no targets


class Model:
    """The book's Model(h_params), on NumPy or CuPy.

    params: name -> array, keyed and shaped like the book's state_dict()
    (without the mask buffers).  The arrays are the model's own storage:
    writing into them in place changes the model.  The per-head Wq/Wk/Wv
    are views into one (3, NH, hs, C) array per block, so attention runs
    all heads at once.

    model.rng is the dropout generator; train.py reseeds it every step.

    With return_logits = False (train.py sets it), a forward with targets
    returns (None, loss): the output layer and the loss run fused, a slice
    of the vocabulary at a time (nanograd/linear_cross_entropy.py), in a
    (B*T, V) work buffer kept between steps.  By default a forward returns
    the logits, as the book's does.

    The gradients of the embedding and of the output layer, 30 MB each in
    the book's config, live in buffers kept between steps too, since
    allocating them afresh costs more than the arithmetic on them.  So,
    like PyTorch's .grad, the arrays backward() returns are overwritten by
    the next backward(): copy them to keep them.
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
        self.qkv = []  # per block: (3, NH, hs, C) storage behind the per-head views
        for i in range(NB):
            blk = f"transformer_blocks.{i}."
            qkv = xp.asarray(np.array([[init[blk + f"mha.heads.{h}.{W}.weight"] for h in range(NH)]
                                       for W in ("Wq", "Wk", "Wv")]), dtype=self.dtype)  # (3, NH, hs, C)
            self.qkv.append(qkv)
            for h in range(NH):
                for j, W in enumerate(("Wq", "Wk", "Wv")):
                    init[blk + f"mha.heads.{h}.{W}.weight"] = qkv[j, h]
        self.params = {name: value if ".mha.heads." in name else xp.asarray(value, dtype=self.dtype)
                       for name, value in init.items()}  # the book's order of names
        self.cache = None
        self.buffers = {}
        self.return_logits = True

    def buffer(self, name, shape):
        """A reusable work array: the same one every call with the same shape."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self.buffers[name] = self.xp.empty(shape, dtype=self.dtype)
        return buf

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
    def hidden(self, idx):
        """Everything up to the final LayerNorm: (B, T) ids -> x (B, T, C) and the caches."""
        p, drop, train = self.params, self.dropout, self.training
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        x, emb_cache = embedding_forward(idx, p["token_embedding_lookup_table.weight"])  # (B, T, C)
        x = x + self.positions[:T]  # (B, T, C) the table is a constant: no gradient
        blocks = []
        for i in range(self.h_params["num_blocks"]):
            blk = f"transformer_blocks.{i}."
            Wq, Wk, Wv = self.qkv[i]  # (NH, hs, C) each
            # x = x + dropout(proj(attention(ln1(x))))
            h, ln1 = layernorm_forward(x, p[blk + "ln1.weight"], p[blk + "ln1.bias"])  # (B, T, C)
            h, attn = attention_forward(h, Wq, Wk, Wv, drop, self.rng, train)  # (B, T, C)
            h, proj = linear_forward(h, p[blk + "mha.projection_layer.weight"],
                                     p[blk + "mha.projection_layer.bias"])  # (B, T, C)
            h, drop1 = dropout_forward(h, drop, self.rng, train)  # (B, T, C)
            x = x + h  # (B, T, C)
            # x = x + dropout(W2 relu(W1 ln2(x) + b1) + b2)
            h, ln2 = layernorm_forward(x, p[blk + "ln2.weight"], p[blk + "ln2.bias"])  # (B, T, C)
            h, fc1 = linear_forward(h, p[blk + "ffn.ffn.0.weight"], p[blk + "ffn.ffn.0.bias"])  # (B, T, 4C)
            h, relu = relu_forward(h)  # (B, T, 4C)
            h, fc2 = linear_forward(h, p[blk + "ffn.ffn.2.weight"], p[blk + "ffn.ffn.2.bias"])  # (B, T, C)
            h, drop2 = dropout_forward(h, drop, self.rng, train)  # (B, T, C)
            x = x + h  # (B, T, C)
            blocks.append(BlockCache(ln1, attn, proj, drop1, ln2, fc1, relu, fc2, drop2))
        final = f"transformer_blocks.{self.h_params['num_blocks']}."
        x, ln_final = layernorm_forward(x, p[final + "weight"], p[final + "bias"])  # (B, T, C)
        return x, emb_cache, blocks, ln_final

    def __call__(self, idx, targets=None):
        """(B, T) ids [, (B, T) targets] -> logits (B, T, V), loss (float or None).

        With targets and return_logits False, the logits are None.
        """
        idx = self.xp.asarray(idx)
        x, emb_cache, blocks, ln_final = self.hidden(idx)  # (B, T, C)
        B, T, C = x.shape
        W, b = self.params["model_out_linear_layer.weight"], self.params["model_out_linear_layer.bias"]
        logits = head = loss = loss_cache = None
        if targets is not None:
            targets = self.xp.asarray(targets).reshape(B * T)  # (B*T,)
        if targets is not None and not self.return_logits:  # output layer and loss fused
            work = self.buffer("work", (B * T, W.shape[0])) if self.xp is np else None  # (B*T, V); CuPy needs none
            loss, loss_cache = linear_cross_entropy_forward(x, W, b, targets, work)
        else:
            logits, head = linear_forward(x, W, b)  # (B, T, V)
            if targets is not None:
                loss, loss_cache = cross_entropy_forward(logits.reshape(B * T, -1), targets)
        self.cache = ForwardCache(emb_cache, blocks, ln_final, head, loss_cache)
        return logits, None if loss is None else float(loss)

    forward = __call__

    # ---- backward ---------------------------------------------------------
    def backward(self, head_ready=None):
        """Gradients of the last forward's mean loss: a dict keyed like params.

        The forward read in reverse.  Where a tensor fed two places (the
        residual stream x feeds both the branch and the sum), the two
        incoming gradients are added with an explicit +=.

        head_ready, if given, is called with the output layer's gradients
        (a dict) as soon as they are final, before the walk back through the
        blocks: train.py starts AdamW on them there (AdamW.start), on the
        core that the blocks' small operations leave idle.
        """
        cache = self.cache
        if cache is None or cache.loss is None:
            raise RuntimeError("backward() needs a forward with targets first")
        grads = {}
        NB, NH = self.h_params["num_blocks"], self.h_params["num_heads"]
        B, T, _ = cache.ln_final.x.shape
        dW_head = self.buffer("dW_head", self.params["model_out_linear_layer.weight"].shape)  # (V, C)
        if cache.head is None:  # the output layer and the loss ran fused
            dx, dW, db = linear_cross_entropy_backward(1.0, cache.loss, dW_out=dW_head)  # (B, T, C)
        else:
            dlogits = cross_entropy_backward(1.0, cache.loss)  # (B*T, V)
            dx, dW, db = linear_backward(dlogits.reshape(B, T, -1), cache.head, dW_out=dW_head)  # (B, T, C)
        grads["model_out_linear_layer.weight"], grads["model_out_linear_layer.bias"] = dW, db
        if head_ready is not None:
            head_ready({"model_out_linear_layer.weight": dW, "model_out_linear_layer.bias": db})
        final = f"transformer_blocks.{NB}."
        dx, grads[final + "weight"], grads[final + "bias"] = layernorm_backward(dx, cache.ln_final)
        for i in reversed(range(NB)):
            blk, c = f"transformer_blocks.{i}.", cache.blocks[i]
            # x = x + dropout(W2 relu(W1 ln2(x) + b1) + b2)
            dh = dropout_backward(dx, c.drop2)  # (B, T, C)
            dh, grads[blk + "ffn.ffn.2.weight"], grads[blk + "ffn.ffn.2.bias"] = linear_backward(dh, c.fc2)
            dh = relu_backward(dh, c.relu)  # (B, T, 4C)
            dh, grads[blk + "ffn.ffn.0.weight"], grads[blk + "ffn.ffn.0.bias"] = linear_backward(dh, c.fc1)
            dh, grads[blk + "ln2.weight"], grads[blk + "ln2.bias"] = layernorm_backward(dh, c.ln2)
            dx += dh  # the residual: x reached the loss directly and through the branch
            # x = x + dropout(proj(attention(ln1(x))))
            dh = dropout_backward(dx, c.drop1)  # (B, T, C)
            dh, grads[blk + "mha.projection_layer.weight"], grads[blk + "mha.projection_layer.bias"] = \
                linear_backward(dh, c.proj)
            dh, dWq, dWk, dWv = attention_backward(dh, c.attn)  # (B, T, C), (NH, hs, C) x 3
            for h in range(NH):
                grads[blk + f"mha.heads.{h}.Wq.weight"] = dWq[h]
                grads[blk + f"mha.heads.{h}.Wk.weight"] = dWk[h]
                grads[blk + f"mha.heads.{h}.Wv.weight"] = dWv[h]
            dh, grads[blk + "ln1.weight"], grads[blk + "ln1.bias"] = layernorm_backward(dh, c.ln1)
            dx += dh
        # x = embedding[idx] + positions: the positions are constant
        grads["token_embedding_lookup_table.weight"] = embedding_backward(
            dx, cache.emb, dW_out=self.buffer("dW_embedding", cache.emb.W_shape))
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
