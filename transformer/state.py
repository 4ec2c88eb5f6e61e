"""What a checkpoint of this project holds, on top of transformer/checkpoint.py's file format.

    tensors  <name>                  every model parameter, named as in the book's state_dict()
             ...heads.<h>.mask       the book's causal-mask buffers, tril(ones(T, T)), so that the
                                     book's PyTorch Model loads the weights with strict=True
             adamw.exp_avg.<name>    AdamW's first moments   (training checkpoints only)
             adamw.exp_avg_sq.<name> AdamW's second moments  (training checkpoints only)
    meta     format, h_params (the book's dict), dtype, step (optimizer steps done),
             adamw (hyperparameters and t, or null), run (seed and settings of the run),
             tokenizer ("cl100k_base"), vocab (original token ids of a --compact-vocab model, or null)

The random state needs no bytes of its own: every draw of step s comes from
a generator seeded by (seed, purpose, s), so (seed, step) restores it.
"""
import numpy as np

from nanograd.backend import to_host

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError
from .model import Model, parameter_shapes
from .validate import check_state, mask_names

FORMAT = "nanograd-transformer"
TOKENIZER = "cl100k_base"
MOMENTS = ("adamw.exp_avg.", "adamw.exp_avg_sq.")  # AdamW's m and v, as torch.optim.AdamW names them


def save_state(path, model, optimizer=None, step=0, run=None, vocab=None):
    """Write the model (and the optimizer, for resuming) to path, atomically."""
    save_checkpoint(path, *state_contents(model, optimizer, step, run, vocab))


def state_contents(model, optimizer=None, step=0, run=None, vocab=None):
    """(tensors, meta) that save_state writes.  On NumPy the tensors are the model's and the
    optimizer's own arrays, not copies: write them before the next update changes them."""
    h = model.h_params
    tensors = {name: to_host(p) for name, p in model.params.items()}
    mask = np.tril(np.ones((h["context_length"],) * 2, dtype=model.dtype))  # (T, T) one array, every head
    tensors.update(dict.fromkeys(mask_names(h), mask))
    adamw = None
    if optimizer is not None:
        for name in model.params:
            tensors[MOMENTS[0] + name] = to_host(optimizer.m[name])
            tensors[MOMENTS[1] + name] = to_host(optimizer.v[name])
        adamw = {"lr": optimizer.lr, "betas": list(optimizer.betas), "eps": optimizer.eps,
                 "weight_decay": optimizer.weight_decay, "t": optimizer.t}  # state_dict() would copy m, v
    meta = {"format": FORMAT, "h_params": dict(h), "dtype": model.dtype.name, "step": int(step),
            "adamw": adamw, "run": dict(run or {}), "tokenizer": TOKENIZER,
            "vocab": None if vocab is None else np.asarray(vocab).tolist()}
    return tensors, meta


def load_state(path):
    """(tensors, meta) of a checkpoint of this project, checked to describe a whole model.
    The masks (constants) are dropped; a --compact-vocab model's ids come back as
    tensors["vocab"], an int64 array, as inference.py and inspect use them."""
    tensors, meta = load_checkpoint(path)
    check_state(tensors, meta, path, FORMAT)  # every field and tensor, and the memory it needs
    for name in mask_names(meta["h_params"]):
        tensors.pop(name, None)
    vocab = meta.pop("vocab")
    if vocab is not None:
        tensors["vocab"] = np.asarray(vocab, dtype=np.int64)  # (V,) checked: ints in the tokenizer's range
    return tensors, meta


def build_model(tensors, meta, backend="numpy", dtype=None):
    """A Model with the checkpoint's h_params and weights (in dtype, default the saved one)."""
    model = Model(meta["h_params"], backend=backend, dtype=dtype or meta.get("dtype", "float32"))
    load_params(model, tensors)
    return model


def load_params(model, tensors):
    """Copy the checkpoint's parameter tensors into the model's arrays, in place."""
    for name, p in model.params.items():
        p[...] = model.xp.asarray(tensors[name], dtype=p.dtype)


def check_resumable(tensors, meta, path):
    """CheckpointError unless the checkpoint holds AdamW's state for every parameter."""
    names = parameter_shapes(meta["h_params"])
    if not meta.get("adamw") or any(m + name not in tensors for name in names for m in MOMENTS):
        raise CheckpointError(f"checkpoint {path} has no optimizer state, so it cannot resume a run; "
                              "it can still be used by inference.py")


def restore_optimizer(optimizer, tensors, meta, path):
    """Load AdamW's moments and step count saved by save_state into optimizer."""
    check_resumable(tensors, meta, path)
    state = dict(meta["adamw"],
                 m={name: tensors[MOMENTS[0] + name] for name in optimizer.params},
                 v={name: tensors[MOMENTS[1] + name] for name in optimizer.params})
    optimizer.load_state_dict(state)
