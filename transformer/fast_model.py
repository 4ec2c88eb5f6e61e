"""FastModel: transformer.model.Model's own walk with faster pieces plugged in.  What train.py trains by default.

FastModel copies no part of the walk (Model.__call__, Model.backward,
nanograd/block.py); it changes only what the walk calls.  Each piece names
the plain code it replaces:

    Model.kernels (nanograd.block.PLAIN_KERNELS)
        -> nanograd.fast.kernels.kernel_table(xp): the plain kernels on NumPy, their CUDA
           twins on CuPy (a LayerNorm or a softmax in one launch)
    Model.kernels.embedding_backward's fresh (V, C) zeros
        -> embedding_backward_into, zeroing a buffer kept between steps (30 MB in the book's
           config: allocating it afresh cost more than the arithmetic on it), its rows added
           by cpu_kernels.scatter_add_rows
    Model.head_forward with targets: linear_forward + cross_entropy_forward of the output layer
        -> linear_cross_entropy_forward: chunked over the vocabulary on every CPU core,
           the (B*T, V) logits never kept (nanograd/fast/linear_cross_entropy.py)
    Model.head_backward: cross_entropy_backward + linear_backward of the output layer
        -> linear_cross_entropy_backward, writing dW into a buffer kept between steps
    (nothing in Model)
        -> head_ready(grads), called with the output layer's final gradients before the
           walk back through the blocks: train.py sets it to FastAdamW.start, which updates
           half of the parameters on one core while this thread walks the blocks

Like PyTorch's .grad, the arrays backward() returns for the output layer and
the embedding are overwritten by the next backward(): copy them to keep them.
Equal to Model to rounding: tests/test_fast_model.py (and on a GPU,
tests/test_cuda_kernels.py).
"""
import numpy as np

from nanograd.fast.cpu_kernels import scatter_add_rows
from nanograd.fast.kernels import kernel_table
from nanograd.fast.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward

from .model import Model
from .params import HEAD_B, HEAD_W


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
        self.kernels.embedding_backward = self.embedding_backward_into

    def buffer(self, name, shape):
        """A work array kept between calls: the same one every call with the same shape."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self.buffers[name] = self.xp.empty(shape, dtype=self.dtype)
        return buf

    def embedding_backward_into(self, dout, cache):
        """nanograd.embedding_backward into a (V, C) buffer kept between steps, instead of fresh zeros."""
        dW = self.buffer("dembedding", cache.W_shape)  # (V, C)
        dW.fill(0)
        scatter_add_rows(dW, cache.idx.reshape(-1), dout.reshape(-1, dW.shape[1]))
        return dW

    def head_forward(self, x, targets):
        """With targets, the fused output layer and loss: (None, loss, cache); else Model's."""
        if targets is None:
            return super().head_forward(x, targets)
        B, T, _ = x.shape
        targets = self.xp.asarray(targets).reshape(B * T)  # (B*T,)
        work = self.buffer("work", (B * T, self.head_W.shape[0])) if self.xp is np else None  # (B*T, V)
        loss, loss_cache = linear_cross_entropy_forward(x, self.head_W, self.head_b, targets, work)
        return None, float(loss), (None, loss_cache)

    def head_backward(self, head):
        """The fused backward into a kept dW, then head_ready with the output layer's gradients."""
        dW_head = self.buffer("dhead_W", self.head_W.shape) if self.xp is np else None  # (V, C)
        dx, dhead_W, dhead_b = linear_cross_entropy_backward(1.0, head[1], dW_out=dW_head)  # (B, T, C)
        if self.head_ready is not None:
            self.head_ready({HEAD_W: dhead_W, HEAD_B: dhead_b})
        return dx, dhead_W, dhead_b
