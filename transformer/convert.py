"""Convert checkpoints: the book's PyTorch files to ours and back, and ours to ours.

    python -m transformer.convert book.pt model/model.ckpt          # the book's torch.save file -> ours
    python -m transformer.convert model/model.ckpt book.pt          # ours -> the book's torch.save file
    python -m transformer.convert model/model.ckpt model.safetensors --weights-only
                                                                    # ours, without the optimizer state
    python -m transformer.convert old.ckpt new.ckpt                 # a checkpoint of the first format
                                                                    # -> today's (safetensors)

What the input is comes from its bytes; what the output is, from its name: a .pt or .pth
file gets the book's torch.save({'model_state_dict', 'h_params'}) (with the causal-mask
buffers its Model registers); any other name gets our safetensors checkpoint (the book's
weights from a PyTorch file; everything, or with --weights-only the weights, from one of
ours).  A PyTorch file is read with torch.load(weights_only=True), which refuses pickled
code.  torch is needed only for the .pt directions.
"""
import argparse
import os
import sys

import numpy as np

from nanograd import AdamW

from .errors import CheckpointError, OneLineParser, UserError, run_command
from .legacy_checkpoint import MAGIC
from . import validate
from .model import Model, parameter_shapes
from .outputs import check_output, replacing
from .validate import check_h_params, check_memory, model_bytes, read_file, size_text
from .state import build_model, load_state, restore_optimizer, save_state

TORCH_SUFFIXES = (".pt", ".pth")


def book_to_ours(src, dst):
    """The book's torch checkpoint at src -> our format at dst (weights only, no optimizer)."""
    import io
    import zipfile

    import torch
    try:
        raw = read_file(src, "checkpoint", per_byte=3)  # the bytes, torch's tensors, our copies
    except OSError as e:
        raise UserError(f"cannot read {src} ({e.strerror}); check its permissions") from None
    try:  # torch's zip entries may be compressed: count what they unpack to before torch does
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError):
        unpacked = len(raw)  # not a zip: torch's legacy format, read as it is
    check_memory(unpacked * 2, f"loading {src} (its {size_text(len(raw))} unpack to {size_text(unpacked)}) needs",
                 "use a machine with more memory, or the file was edited")
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for foreign or damaged files
        raise UserError(f"{src} is neither a checkpoint of ours nor a PyTorch checkpoint torch can "
                        f"load safely ({type(e).__name__})") from None
    del raw
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model_state_dict"), dict)
            and isinstance(ckpt.get("h_params"), dict)):
        raise UserError(f"{src} is a PyTorch file but not the book's {{'model_state_dict', 'h_params'}} "
                        "checkpoint (two dicts)")
    h_params = {k: v for k, v in ckpt["h_params"].items()
                if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
    try:
        check_h_params(h_params)
    except UserError as e:
        raise UserError(f"{src} holds unusable h_params: {e}") from None
    state = {k: v for k, v in ckpt["model_state_dict"].items() if not (isinstance(k, str) and k.endswith(".mask"))}
    dtype = check_torch_state(src, state, h_params)
    check_memory(model_bytes(h_params, 8) + sum(v.numel() for v in state.values()) * 8,
                 f"converting {src} (d_model {h_params['d_model']}, num_blocks {h_params['num_blocks']}, "
                 f"context_length {h_params['context_length']}) needs", "use a machine with more memory")
    model = Model(h_params, dtype=dtype)
    for name, p in model.params.items():
        p[...] = state[name].detach().numpy()
    save_state(dst, model, run={"converted_from": os.path.abspath(src)})


def check_torch_state(src, state, h_params):
    """UserError unless state holds exactly the book model's dense, finite float32 or float64
    tensors for h_params; returns that dtype's name.  Counted before listing the names, so a
    crafted num_blocks costs nothing."""
    import torch
    if validate.parameter_tensor_count(h_params) != len(state):
        raise UserError(f"{src} holds {len(state)} weight tensors but the book's model for its h_params "
                        f"has {validate.parameter_tensor_count(h_params)}; its weights do not match its h_params")
    expected = parameter_shapes(h_params)
    if set(state) != set(expected):
        raise UserError(f"{src}'s weights do not match the book's model for its own h_params")
    kinds = {torch.float32: "float32", torch.float64: "float64"}
    for name, shape in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a {value.layout} tensor"
            raise UserError(f"{src}'s weight {name} is {what}, not a dense tensor; save the model's "
                            "state_dict() as the book does")
        if value.dtype not in kinds:
            raise UserError(f"{src}'s weight {name} is {value.dtype}; only float32 and float64 convert "
                            "exactly (convert the model with .float() first)")
        if tuple(value.shape) != shape:
            raise UserError(f"{src}'s weight {name} has shape {tuple(value.shape)} but the book's model "
                            f"for its h_params needs {shape}")
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"{src}'s weight {name} holds NaN or infinite values; nothing to convert")
    return kinds[state["token_embedding_lookup_table.weight"].dtype]


def ours_to_book(src, dst):
    """Our checkpoint at src -> the book's torch.save({'model_state_dict', 'h_params'}) at dst."""
    import torch
    from . import book_torch
    tensors, meta = load_state(src)
    if "vocab" in tensors:
        raise UserError(f"{src} was trained with --compact-vocab; the book's model has no place for its "
                        "id mapping, so it cannot be converted")
    model = build_model(tensors, meta)
    h_params = {"dropout": 0.0, **meta["h_params"]}  # the book's Model reads dropout; ours defaults it to 0
    torch_model = book_torch.Model(h_params).to(torch.float64 if model.dtype == np.float64 else torch.float32)
    book_torch.load_numpy_params(torch_model, {k: np.asarray(v) for k, v in model.params.items()})
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)  # as save_checkpoint does
    with replacing(dst) as tmp:
        torch.save({"model_state_dict": torch_model.state_dict(), "h_params": h_params}, tmp)


def ours_to_ours(src, dst, weights_only):
    """Our checkpoint at src (of either format) -> today's format at dst; without the optimizer
    state if weights_only (or if src has none)."""
    tensors, meta = load_state(src)
    model = build_model(tensors, meta)
    optimizer = None
    if meta["adamw"] is not None and not weights_only:
        optimizer = AdamW(model.params)
        restore_optimizer(optimizer, tensors, meta, src)
    save_state(dst, model, optimizer, meta["step"], meta["run"], tensors.get("vocab"))


def is_ours(path):
    """True when the regular file at path starts as a checkpoint of ours does: the first
    format's magic bytes, or a safetensors header (8 bytes of length, then its JSON's "{")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # main() checked it is a regular file
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        start = f.read(9)
    return start.startswith(MAGIC) or start[8:9] == b"{"


def main(argv=None):
    parser = OneLineParser(prog="python -m transformer.convert", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a checkpoint of ours, or the book's PyTorch checkpoint")
    parser.add_argument("dst", help="the output: .pt or .pth for the book's PyTorch format, any other "
                                    "name (.safetensors, .ckpt) for ours")
    parser.add_argument("--weights-only", action="store_true",
                        help="leave out the optimizer state (ours -> ours): a file to share or to load "
                             "into the book's PyTorch model with strict=True")
    parser.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.src):
            raise UserError(f"{args.src} does not exist or is not a file; give a checkpoint path")
        check_output(args.dst, "", inputs=[args.src])  # before converting, and whatever --force says
        if os.path.exists(args.dst) and not args.force:
            raise UserError(f"{args.dst} exists; choose another path or pass --force to overwrite it")
        to_torch = args.dst.lower().endswith(TORCH_SUFFIXES)
        from_ours = is_ours(args.src)
        if not from_ours and to_torch:
            raise UserError(f"{args.src} is not a checkpoint of ours, and {args.dst} would be a PyTorch file "
                            "too; name the output .safetensors or .ckpt to convert it to ours")
        if to_torch or not from_ours:
            try:
                import torch  # noqa: F401
            except ImportError:
                raise UserError("converting needs PyTorch: pip install torch==2.13.0") from None
        try:
            if to_torch:
                ours_to_book(args.src, args.dst)
            elif from_ours:
                ours_to_ours(args.src, args.dst, args.weights_only)
            else:
                book_to_ours(args.src, args.dst)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
            raise UserError(f"cannot write {args.dst} ({reason}); nothing was written there") from None
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # printed outside the try: a failed print is not a failed write (run_command reports it)
    print(f"Wrote the book's PyTorch checkpoint {args.dst}" if to_torch
          else f"Wrote {args.dst} (safetensors; load it with inference.py --ckpt {args.dst})")
    return 0


if __name__ == "__main__":
    run_command(main)
