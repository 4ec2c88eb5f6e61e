"""The book's state_dict() keys: their shapes, PyTorch's initialisation, and the names they bind to.

The book's PyTorch Model stores each head's Wq, Wk, Wv as its own nn.Linear and
the final LayerNorm as the last entry of its nn.Sequential of blocks; Model here
keeps exactly those keys in model.params, so a checkpoint is the book's
state_dict().  This module is that bookkeeping, kept out of model.py's way.
"""
import math

import numpy as np

from nanograd.block import BlockParams


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


def block_names(i, NH):
    """BlockParams field -> the book's key (or, for Wq/Wk/Wv, the NH per-head keys) in block i."""
    prefix = f"transformer_blocks.{i}."
    names = {field: prefix + key for field, key in BLOCK_KEYS.items()}
    for role in HEAD_ROLES:
        names[role] = [prefix + f"mha.heads.{h}.{role}.weight" for h in range(NH)]
    return names


def bind_blocks(params, num_blocks, NH, xp):
    """A BlockParams per block, its fields the arrays of params.

    Each role's NH per-head (hs, C) weights are stacked into one (NH, hs, C)
    array, and params' per-head entries are replaced by views of the stack,
    so the model and its state_dict share the same storage.
    """
    blocks = []
    for i in range(num_blocks):
        fields = {}
        for field, name in block_names(i, NH).items():
            if field in HEAD_ROLES:
                fields[field] = xp.stack([params[n] for n in name])  # (NH, hs, C)
                for h, n in enumerate(name):
                    params[n] = fields[field][h]  # (hs, C) a view
            else:
                fields[field] = params[name]
        blocks.append(BlockParams(**fields))
    return blocks


def named_grads(params, dembedding, dblocks, dfinal_ln_w, dfinal_ln_b, dhead_W, dhead_b, NH):
    """The gradients under the book's keys, in params' order (per-head views of dWq, dWk, dWv)."""
    NB = len(dblocks)
    grads = {EMBEDDING: dembedding, HEAD_W: dhead_W, HEAD_B: dhead_b,
             f"transformer_blocks.{NB}.weight": dfinal_ln_w, f"transformer_blocks.{NB}.bias": dfinal_ln_b}
    for i, dblk in enumerate(dblocks):
        for field, name in block_names(i, NH).items():
            if field in HEAD_ROLES:
                grads.update(zip(name, getattr(dblk, field)))  # (hs, C) per head
            else:
                grads[name] = getattr(dblk, field)
    return {name: grads[name] for name in params}
