"""Convert between the book's PyTorch checkpoints and ours.

    python -m transformer.convert book.ckpt model/model.ckpt     # book (torch.save) -> ours
    python -m transformer.convert model/model.ckpt book.ckpt     # ours -> book's format

The direction follows the input: a checkpoint of ours becomes the book's
{'model_state_dict', 'h_params'} (with the causal-mask buffers its Model
registers), anything else is read as the book's with torch.load(weights_only=True),
which refuses pickled code.  torch is needed only here.
"""
import os
import sys

import numpy as np

from .errors import CheckpointError, OneLineParser, UserError, run_command
from .checkpoint import MAGIC
from .model import Model, parameter_shapes, validate_h_params
from .state import build_model, load_state, save_state


def book_to_ours(src, dst):
    """The book's torch checkpoint at src -> our format at dst (weights only, no optimizer)."""
    import torch
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for foreign or damaged files
        raise UserError(f"{src} is neither a checkpoint of ours nor a PyTorch checkpoint torch can "
                        f"load safely ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and "model_state_dict" in ckpt and "h_params" in ckpt):
        raise UserError(f"{src} is a PyTorch file but not the book's {{'model_state_dict', 'h_params'}} checkpoint")
    h_params = {k: v for k, v in ckpt["h_params"].items() if isinstance(v, (int, float, str, bool))}
    validate_h_params(h_params)
    state = {k: v for k, v in ckpt["model_state_dict"].items() if not k.endswith(".mask")}
    expected = parameter_shapes(h_params)
    if set(state) != set(expected) or any(tuple(state[k].shape) != expected[k] for k in expected):
        raise UserError(f"{src}'s weights do not match the book's model for its own h_params")
    dtype = "float64" if state["token_embedding_lookup_table.weight"].dtype == torch.float64 else "float32"
    model = Model(h_params, dtype=dtype)
    for name, p in model.params.items():
        p[...] = state[name].detach().numpy()
    save_state(dst, model, run={"converted_from": os.path.abspath(src)})


def ours_to_book(src, dst):
    """Our checkpoint at src -> the book's torch.save({'model_state_dict', 'h_params'}) at dst."""
    import torch
    from . import book_torch
    tensors, meta = load_state(src)
    if "vocab" in tensors:
        raise UserError(f"{src} was trained with --compact-vocab; the book's model has no place for its "
                        "id mapping, so it cannot be converted")
    model = build_model(tensors, meta)
    torch_model = book_torch.Model(meta["h_params"]).to(torch.float64 if model.dtype == np.float64 else torch.float32)
    book_torch.load_numpy_params(torch_model, {k: np.asarray(v) for k, v in model.params.items()})
    tmp = f"{dst}.tmp.{os.getpid()}"
    torch.save({"model_state_dict": torch_model.state_dict(), "h_params": dict(meta["h_params"])}, tmp)
    os.replace(tmp, dst)


def is_ours(path):
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def main(argv=None):
    parser = OneLineParser(prog="python -m transformer.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.src):
            raise UserError(f"{args.src} does not exist or is not a file; give a checkpoint path")
        if os.path.exists(args.dst) and not args.force:
            raise UserError(f"{args.dst} exists; choose another path or pass --force to overwrite it")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UserError("converting needs PyTorch: pip install torch==2.13.0") from None
        if is_ours(args.src):
            ours_to_book(args.src, args.dst)
            print(f"Wrote the book's PyTorch checkpoint {args.dst}")
        else:
            book_to_ours(args.src, args.dst)
            print(f"Wrote {args.dst} (load it with inference.py --ckpt {args.dst})")
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_command(main)
