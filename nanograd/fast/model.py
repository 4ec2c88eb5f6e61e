"""FastModel: transformer.model.Model walked the same way, faster.  What train.py trains by default.

Each piece names the plain code of Model it replaces:

    Model.__call__ with targets: linear_forward + cross_entropy_forward of the output layer
        -> linear_cross_entropy_forward: chunked over the vocabulary on every CPU core,
           the (B*T, V) logits never kept (nanograd/fast/linear_cross_entropy.py)
    Model.backward: cross_entropy_backward + linear_backward of the output layer
        -> linear_cross_entropy_backward, writing dW into a buffer kept between steps
    Model.backward: embedding_backward's fresh (V, C) zeros
        -> embedding_backward_into, zeroing a buffer kept between steps (30 MB each in
           the book's config: allocating them afresh cost more than the arithmetic on them)
    (nothing in Model)
        -> head_ready(grads), called with the output layer's final gradients before the
           walk back through the blocks: train.py sets it to FastAdamW.start, which updates
           half of the parameters on one core while this thread walks the blocks
    Model.block_forward / block_backward and the final LayerNorm: linear, relu, layernorm, attention
        -> the kernels of self.kernels: on NumPy their twins cut by rows over every CPU
           core (cpu_kernels.py), on CuPy the CUDA LayerNorm and attention (cuda_kernels.py),
           a LayerNorm or a softmax in one launch

Like PyTorch's .grad, the arrays backward() returns for the output layer and
the embedding are overwritten by the next backward(): copy them to keep them.
Equal to Model to rounding: tests/test_fast_model.py (and on a GPU,
tests/test_cuda_kernels.py).
"""
from types import SimpleNamespace

import numpy as np

from transformer.model import EMBEDDING, HEAD_B, HEAD_W, BlockCache, BlockParams, ForwardCache, Model

from .. import linear, relu
from ..backend import scatter_add
from ..dropout import dropout_backward, dropout_forward
from ..embedding import embedding_forward
from . import cpu_kernels, cuda_kernels
from .linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward


def kernel_table(xp):
    """The blocks' kernels FastModel runs: on NumPy the threaded ones of cpu_kernels.py, on CuPy
    the plain linear and ReLU with the CUDA LayerNorm and attention."""
    if xp is np:
        source = dict.fromkeys(("layernorm", "attention", "linear", "relu"), cpu_kernels)
    else:
        source = dict(layernorm=cuda_kernels, attention=cuda_kernels, linear=linear, relu=relu)
    return SimpleNamespace(**{f"{op}_{way}": getattr(module, f"{op}_{way}")
                              for op, module in source.items() for way in ("forward", "backward")})


def embedding_backward_into(dW, dout, cache):
    """nanograd.embedding_backward into dW (V, C), a buffer kept between steps, instead of fresh zeros."""
    dW.fill(0)
    scatter_add(dW, cache.idx.reshape(-1), dout.reshape(-1, dW.shape[1]))
    return dW


class FastModel(Model):
    """Model (same constructor, parameters and numbers) with the replacements listed above.

    A forward with targets returns (None, loss): the logits are never made.
    Without targets it is Model's forward and returns the logits.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffers = {}
        self.head_ready = None  # called with the output layer's gradients mid-backward (see above)
        self.kernels = kernel_table(self.xp)

    def buffer(self, name, shape):
        """A work array kept between calls: the same one every call with the same shape."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self.buffers[name] = self.xp.empty(shape, dtype=self.dtype)
        return buf

    def __call__(self, idx, targets=None):
        if targets is None:
            return super().__call__(idx)
        idx = self.xp.asarray(idx)
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        x, emb = embedding_forward(idx, self.embedding)  # (B, T, C)
        x = x + self.positions[:T]  # (B, T, C)
        blocks = []
        for blk in self.blocks:
            x, block = self.block_forward(x, blk)  # (B, T, C)
            blocks.append(block)
        x, ln_final = self.kernels.layernorm_forward(x, self.final_ln_w, self.final_ln_b)  # (B, T, C)
        targets = self.xp.asarray(targets).reshape(B * T)  # (B*T,)
        work = self.buffer("work", (B * T, self.head_W.shape[0])) if self.xp is np else None  # (B*T, V)
        loss, loss_cache = linear_cross_entropy_forward(x, self.head_W, self.head_b, targets, work)
        self.cache = ForwardCache(emb, blocks, ln_final, None, loss_cache)
        return None, float(loss)

    forward = __call__

    def backward(self):
        cache = self.cache
        if cache is None or cache.loss is None:
            raise RuntimeError("backward() needs a forward with targets first")
        dW_head = self.buffer("dhead_W", self.head_W.shape) if self.xp is np else None  # (V, C)
        dx, dhead_W, dhead_b = linear_cross_entropy_backward(1.0, cache.loss, dW_out=dW_head)  # (B, T, C)
        if self.head_ready is not None:
            self.head_ready({HEAD_W: dhead_W, HEAD_B: dhead_b})
        dx, dfinal_ln_w, dfinal_ln_b = self.kernels.layernorm_backward(dx, cache.ln_final)  # (B, T, C)
        dblocks = [None] * len(self.blocks)
        for i in reversed(range(len(self.blocks))):
            dx, dblocks[i] = self.block_backward(dx, cache.blocks[i])  # (B, T, C)
        dembedding = embedding_backward_into(self.buffer("dembedding", self.params[EMBEDDING].shape), dx, cache.emb)
        return self.named_grads(dembedding, dblocks, dfinal_ln_w, dfinal_ln_b, dhead_W, dhead_b)

    def block_forward(self, x, blk):
        """Model.block_forward, its LayerNorms and attention from self.kernels."""
        k, p, rng, train = self.kernels, self.dropout, self.rng, self.training
        h, ln1 = k.layernorm_forward(x, blk.ln1_w, blk.ln1_b)  # (B, T, C)
        h, attn = k.attention_forward(h, blk.Wq, blk.Wk, blk.Wv, p, rng, train)  # (B, T, C)
        h, proj = k.linear_forward(h, blk.proj_W, blk.proj_b)  # (B, T, C)
        h, drop1 = dropout_forward(h, p, rng, train)  # (B, T, C)
        x = x + h  # (B, T, C)
        h, ln2 = k.layernorm_forward(x, blk.ln2_w, blk.ln2_b)  # (B, T, C)
        h, fc1 = k.linear_forward(h, blk.fc1_W, blk.fc1_b)  # (B, T, 4C)
        h, relu = k.relu_forward(h)  # (B, T, 4C)
        h, fc2 = k.linear_forward(h, blk.fc2_W, blk.fc2_b)  # (B, T, C)
        h, drop2 = dropout_forward(h, p, rng, train)  # (B, T, C)
        x = x + h  # (B, T, C)
        return x, BlockCache(ln1, attn, proj, drop1, ln2, fc1, relu, fc2, drop2)

    def block_backward(self, dx, c):
        """Model.block_backward, its LayerNorms and attention from self.kernels."""
        k = self.kernels
        dh = dropout_backward(dx, c.drop2)  # (B, T, C)
        dh, dfc2_W, dfc2_b = k.linear_backward(dh, c.fc2)  # (B, T, 4C)
        dh = k.relu_backward(dh, c.relu)  # (B, T, 4C)
        dh, dfc1_W, dfc1_b = k.linear_backward(dh, c.fc1)  # (B, T, C)
        dh, dln2_w, dln2_b = k.layernorm_backward(dh, c.ln2)  # (B, T, C)
        dx += dh
        dh = dropout_backward(dx, c.drop1)  # (B, T, C)
        dh, dproj_W, dproj_b = k.linear_backward(dh, c.proj)  # (B, T, C)
        dh, dWq, dWk, dWv = k.attention_backward(dh, c.attn)  # (B, T, C), (NH, hs, C) x 3
        dh, dln1_w, dln1_b = k.layernorm_backward(dh, c.ln1)  # (B, T, C)
        dx += dh
        return dx, BlockParams(dln1_w, dln1_b, dWq, dWk, dWv, dproj_W, dproj_b,
                               dln2_w, dln2_b, dfc1_W, dfc1_b, dfc2_W, dfc2_b)
