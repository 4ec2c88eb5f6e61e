"""What a checkpoint of this project holds, on top of transformer/checkpoint.py's file format.

    tensors  params/<name>       every model parameter, keyed like the book's state_dict()
             adamw/m/<name>      AdamW's first moments   (training checkpoints only)
             adamw/v/<name>      AdamW's second moments  (training checkpoints only)
             vocab               original token ids of a --compact-vocab model (optional)
    meta     format, h_params (the book's dict), dtype, step (optimizer steps done),
             adamw (hyperparameters and t), run (seed and settings of the run)

The random state needs no bytes of its own: every draw of step s comes from
a generator seeded by (seed, purpose, s), so (seed, step) restores it.
"""
import numpy as np

from nanograd.backend import to_host

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError
from .model import Model, parameter_shapes
from .validate import check_state

FORMAT = "nanograd-transformer"


def save_state(path, model, optimizer=None, step=0, run=None, vocab=None):
    """Write the model (and the optimizer, for resuming) to path, atomically."""
    save_checkpoint(path, *state_contents(model, optimizer, step, run, vocab))


def state_contents(model, optimizer=None, step=0, run=None, vocab=None):
    """(tensors, meta) that save_state writes.  On NumPy the tensors are the model's and the
    optimizer's own arrays, not copies: write them before the next update changes them."""
    tensors = {f"params/{name}": to_host(p) for name, p in model.params.items()}
    adamw = None
    if optimizer is not None:
        for name in model.params:
            tensors[f"adamw/m/{name}"] = to_host(optimizer.m[name])
            tensors[f"adamw/v/{name}"] = to_host(optimizer.v[name])
        adamw = {"lr": optimizer.lr, "betas": list(optimizer.betas), "eps": optimizer.eps,
                 "weight_decay": optimizer.weight_decay, "t": optimizer.t}  # state_dict() would copy m, v
    if vocab is not None:
        tensors["vocab"] = np.asarray(vocab, dtype=np.int64)
    meta = {"format": FORMAT, "h_params": dict(model.h_params), "dtype": model.dtype.name,
            "step": int(step), "adamw": adamw, "run": dict(run or {})}
    return tensors, meta


def load_state(path):
    """(tensors, meta) of a checkpoint of this project, checked to describe a whole model."""
    tensors, meta = load_checkpoint(path)
    check_state(tensors, meta, path, FORMAT)  # every field and tensor, and the memory it needs
    return tensors, meta


def build_model(tensors, meta, backend="numpy", dtype=None):
    """A Model with the checkpoint's h_params and weights (in dtype, default the saved one)."""
    model = Model(meta["h_params"], backend=backend, dtype=dtype or meta.get("dtype", "float32"))
    load_params(model, tensors)
    return model


def load_params(model, tensors):
    """Copy the checkpoint's params/<name> tensors into the model's arrays, in place."""
    for name, p in model.params.items():
        p[...] = model.xp.asarray(tensors[f"params/{name}"], dtype=p.dtype)


def check_resumable(tensors, meta, path):
    """CheckpointError unless the checkpoint holds AdamW's state for every parameter."""
    names = parameter_shapes(meta["h_params"])
    if not meta.get("adamw") or any(f"adamw/{m}/{name}" not in tensors for name in names for m in "mv"):
        raise CheckpointError(f"checkpoint {path} has no optimizer state, so it cannot resume a run; "
                              "it can still be used by inference.py")


def restore_optimizer(optimizer, tensors, meta, path):
    """Load AdamW's moments and step count saved by save_state into optimizer."""
    check_resumable(tensors, meta, path)
    state = dict(meta["adamw"],
                 m={name: tensors[f"adamw/m/{name}"] for name in optimizer.params},
                 v={name: tensors[f"adamw/v/{name}"] for name in optimizer.params})
    optimizer.load_state_dict(state)
