"""Gradient check of the whole model: nanograd.gradcheck's table of kernels plus a row for transformer.Model.

    python -m transformer.gradcheck                  # every kernel, the block, and the model
    python -m transformer.gradcheck --kernel model   # the model row alone

nanograd never imports transformer, so the row that needs the model lives
here; the cases, the checks, the table and the flags are nanograd.gradcheck's
(see its docstring for how to read a row).

The model row: transformer.Model(MODEL_H_PARAMS) in float64, dropout on with
the same masks every call, random ids and targets.  Its one input is a vector
of ENTRIES_PER_PARAM random entries of every parameter; its output is the
mean loss.  The forward writes the vector into the parameters (their arrays
are the model's own storage) and runs the whole model; the backward is
Model.backward() read at those entries.  So each entry is moved by +-h and
everything reruns, embedding, blocks, final LayerNorm, output layer and loss:
a check of the walk itself, not only of the kernels it calls.
"""
import sys

import numpy as np

from nanograd import gradcheck
from nanograd.backend import make_rng

from .errors import run_command
from .model import Model

# As small as the kernel cases (C = 8, NH = 2, V = 11, B x T = 2 x 5), with two blocks so that
# a gradient has to cross a whole block and a residual fan-out between them.
MODEL_H_PARAMS = dict(d_model=8, num_blocks=2, num_heads=2, context_length=5, dropout=0.1, max_token_value=11)
ENTRIES_PER_PARAM = 2


def model_case(xp, seed=0):
    """(Case, note): the model row's Case, and note(rows) -> the line that names its worst entry."""
    backend = "cupy" if xp.__name__ == "cupy" else "numpy"
    model = Model(MODEL_H_PARAMS, backend=backend, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    B, T, V = gradcheck.SIZES["B"], gradcheck.SIZES["T"], MODEL_H_PARAMS["max_token_value"]
    idx, targets = rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))  # (B, T) each
    picks = [(name, tuple(int(i) for i in np.unravel_index(flat, p.shape)))  # distinct entries of each
             for name, p in model.params.items()
             for flat in rng.choice(p.size, size=min(ENTRIES_PER_PARAM, p.size), replace=False)]
    entries = np.array([float(model.params[name][index]) for name, index in picks])  # (entries,)

    def forward(entries):
        for (name, index), value in zip(picks, entries):
            model.params[name][index] = value
        model.rng = make_rng(model.xp, seed, 1)  # the same dropout masks every call
        _, loss = model(idx, targets)
        return np.asarray(loss), None  # () the mean loss

    def backward(dloss, cache):
        grads = model.backward()
        return np.array([float(grads[name][index]) for name, index in picks]) * dloss  # (entries,)

    def note(rows):
        name, index = picks[rows[0].worst_index[0]]
        settings = ", ".join(f"{k}={v}" for k, v in MODEL_H_PARAMS.items())
        return (f"model: transformer.Model({settings}) in float64, B={B} T={T};\n"
                f"       {len(picks)} entries, {ENTRIES_PER_PARAM} random ones of each of its {len(model.params)} "
                f"parameters; worst {rows[0].worst_index} is {name}{list(index)}")

    return gradcheck.Case("model", forward, backward, [entries], [0], ["params"], None), note


def main(argv=None):
    return gradcheck.main(argv, prog="python -m transformer.gradcheck", more=[("model", model_case)])


if __name__ == "__main__":
    run_command(lambda: main(sys.argv[1:]))
