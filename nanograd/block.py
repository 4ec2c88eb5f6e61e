"""One transformer block, the book's TransformerBlock, as a forward/backward pair like any kernel.

    x1  = x  + dropout(proj(attention(ln1(x))))       (B, T, C)
    out = x1 + dropout(fc2(relu(fc1(ln2(x1)))))       (B, T, C)

Every intermediate has a name, and its gradient is d + that name, so the
backward can be read line by line against the forward (and traced:
python -m nanograd.trace block).  The kernels it calls come from `kernels`,
by default PLAIN_KERNELS, nanograd's own; nanograd.fast passes a table with
faster twins, so the walk itself is written only here.
"""
from types import SimpleNamespace
from typing import NamedTuple

from .attention import attention_backward, attention_forward
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .relu import relu_backward, relu_forward

# The kernels a model walk calls, by name.  A fast table has the same names.
PLAIN_KERNELS = SimpleNamespace(
    embedding_forward=embedding_forward, embedding_backward=embedding_backward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    attention_forward=attention_forward, attention_backward=attention_backward,
    linear_forward=linear_forward, linear_backward=linear_backward,
    relu_forward=relu_forward, relu_backward=relu_backward,
    dropout_forward=dropout_forward, dropout_backward=dropout_backward,
)  # and blocks_forward, blocks_backward: the walk through every block, below


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


class BlockCache(NamedTuple):
    """Each kernel's cache, named for the kernel; kernels: the table the forward used."""
    ln1: object
    attn: object
    proj: object
    drop1: object
    ln2: object
    fc1: object
    relu: object
    fc2: object
    drop2: object
    kernels: object


def block_forward(x, blk, dropout_p=0.0, rng=None, train=True, kernels=PLAIN_KERNELS):
    """x (B, T, C), BlockParams -> out (B, T, C), BlockCache.

    dropout_p, rng and train go to the three dropouts (after the projection,
    after fc2, and on the attention weights inside attention).
    """
    k = kernels
    # x1 = x + dropout(proj(attention(ln1(x))))
    ln1_out, ln1 = k.layernorm_forward(x, blk.ln1_w, blk.ln1_b)  # (B, T, C)
    attn_out, attn = k.attention_forward(ln1_out, blk.Wq, blk.Wk, blk.Wv, dropout_p, rng, train)  # (B, T, C)
    proj_out, proj = k.linear_forward(attn_out, blk.proj_W, blk.proj_b)  # (B, T, C)
    drop1_out, drop1 = k.dropout_forward(proj_out, dropout_p, rng, train)  # (B, T, C)
    x1 = x + drop1_out  # (B, T, C)
    # out = x1 + dropout(fc2(relu(fc1(ln2(x1)))))
    ln2_out, ln2 = k.layernorm_forward(x1, blk.ln2_w, blk.ln2_b)  # (B, T, C)
    fc1_out, fc1 = k.linear_forward(ln2_out, blk.fc1_W, blk.fc1_b)  # (B, T, 4C)
    relu_out, relu = k.relu_forward(fc1_out)  # (B, T, 4C)
    fc2_out, fc2 = k.linear_forward(relu_out, blk.fc2_W, blk.fc2_b)  # (B, T, C)
    drop2_out, drop2 = k.dropout_forward(fc2_out, dropout_p, rng, train)  # (B, T, C)
    out = x1 + drop2_out  # (B, T, C)
    return out, BlockCache(ln1, attn, proj, drop1, ln2, fc1, relu, fc2, drop2, kernels)


def block_backward(dout, cache):
    """dout (B, T, C) -> dx (B, T, C), BlockParams of the gradients: the forward read upwards.

    A residual sum y = a + b passes dy to both a and b unchanged.  x1 fans
    out twice, into out directly and into ln2: its gradient is the sum of
    the two paths, written as an explicit `dx1 += dout` after the branch's
    part (and likewise for x).  docs/model.md draws it.
    """
    c, k = cache, cache.kernels
    # out = x1 + dropout(fc2(relu(fc1(ln2(x1)))))
    dfc2_out = k.dropout_backward(dout, c.drop2)  # (B, T, C)
    drelu_out, dfc2_W, dfc2_b = k.linear_backward(dfc2_out, c.fc2)  # (B, T, 4C), (C, 4C), (C,)
    dfc1_out = k.relu_backward(drelu_out, c.relu)  # (B, T, 4C)
    dln2_out, dfc1_W, dfc1_b = k.linear_backward(dfc1_out, c.fc1)  # (B, T, C), (4C, C), (4C,)
    dx1, dln2_w, dln2_b = k.layernorm_backward(dln2_out, c.ln2)  # (B, T, C) x1's path through the branch
    dx1 += dout  # plus its direct path to out
    # x1 = x + dropout(proj(attention(ln1(x))))
    dproj_out = k.dropout_backward(dx1, c.drop1)  # (B, T, C)
    dattn_out, dproj_W, dproj_b = k.linear_backward(dproj_out, c.proj)  # (B, T, C), (C, C), (C,)
    dln1_out, dWq, dWk, dWv = k.attention_backward(dattn_out, c.attn)  # (B, T, C), (NH, hs, C) x 3
    dx, dln1_w, dln1_b = k.layernorm_backward(dln1_out, c.ln1)  # (B, T, C) x's path through the branch
    dx += dx1  # plus its direct path to x1
    return dx, BlockParams(dln1_w, dln1_b, dWq, dWk, dWv, dproj_W, dproj_b,
                           dln2_w, dln2_b, dfc1_W, dfc1_b, dfc2_W, dfc2_b)


def blocks_forward(x, blocks, dropout_p=0.0, rng=None, train=True, kernels=PLAIN_KERNELS):
    """x (B, T, C) through every block in turn -> out (B, T, C), a BlockCache per block."""
    caches = []
    for blk in blocks:
        x, cache = block_forward(x, blk, dropout_p, rng, train, kernels)  # (B, T, C)
        caches.append(cache)
    return x, caches


def blocks_backward(dout, caches):
    """dout (B, T, C) back through the blocks, last to first -> dx (B, T, C), a BlockParams of gradients per block."""
    dblocks = [None] * len(caches)
    for i in reversed(range(len(caches))):
        dout, dblocks[i] = block_backward(dout, caches[i])  # (B, T, C), BlockParams
    return dout, dblocks


PLAIN_KERNELS.blocks_forward, PLAIN_KERNELS.blocks_backward = blocks_forward, blocks_backward
