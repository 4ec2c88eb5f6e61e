"""Draw every attention head's weights for a prompt, one PNG per head (like the book's notebook).

    python -m transformer.inspect --prompt "Return the number of items" --out-dir attention/

Each image is the (T, T) softmax matrix of one head: row t shows how much
position t attends to each earlier position (the upper triangle is the
causal mask, always 0).  Needs matplotlib: pip install matplotlib.
"""
import os
import sys

import numpy as np

from nanograd.backend import BackendError, get_backend, to_host

from .errors import OneLineParser, UserError, run_command
from .outputs import DEFAULT_OUT, check_default_folder, check_not_special
from .state import build_model, load_state
from .tokenizer import encode_prompt, get_tokenizer


def attention_maps(model, ids):
    """Every block's attention weights for ids (T,): a list of (NH, T, T) host arrays."""
    model.eval()
    model(ids[None])  # the forward keeps each block's softmax weights in its cache
    return [to_host(block.attn.att[0]) for block in model.cache.blocks]


def draw(maps, labels, out_dir):
    """One PNG per block and head; returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing attention maps needs matplotlib: pip install matplotlib") from None
    paths = []
    T = len(labels)
    for i, heads in enumerate(maps):
        for h, att in enumerate(heads):
            size = max(4.0, 0.28 * T + 1.5)
            fig, ax = plt.subplots(figsize=(size + 1, size))
            image = ax.imshow(att, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
            ax.set_xlabel("attends to (key)")
            ax.set_ylabel("position (query)")
            ax.set_title(f"block {i}, head {h}")
            fig.colorbar(image, ax=ax, fraction=0.046)
            fig.tight_layout()
            path = os.path.join(out_dir, f"block{i}_head{h}.png")
            tmp = f"{path}.tmp.{os.getpid()}"  # then renamed: a link there is replaced, not followed
            try:
                check_not_special(path, "the image")
                fig.savefig(tmp, dpi=100, format="png")
                os.replace(tmp, path)
            except OSError as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise UserError(f"cannot write {path} ({e.strerror}); choose another --out-dir") from e
            finally:
                plt.close(fig)
            paths.append(path)
    return paths


def check_out_dir(out_dir):
    """UserError unless out_dir is (or can be made) a folder we may write in; makes it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file, not a folder; give a folder (made if missing)")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {out_dir} ({e.strerror}); choose another --out-dir") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out_dir} is not writable (Permission denied); choose another --out-dir")


def main(argv=None):
    parser = OneLineParser(prog="python -m transformer.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=DEFAULT_OUT)
    parser.add_argument("--prompt", default="Return the number of items in the list.")
    parser.add_argument("--out-dir", default="attention")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    args = parser.parse_args(argv)
    try:
        get_backend(args.backend)
        check_default_folder(args.ckpt)
        tensors, meta = load_state(args.ckpt)
        model = build_model(tensors, meta, backend=args.backend)
        tokenizer = get_tokenizer()
        ids = encode_prompt(args.prompt, tokenizer, tensors.get("vocab"), meta["h_params"]["max_token_value"])
        ids = ids[-model.context_length:]
        raw = ids if "vocab" not in tensors else tensors["vocab"][ids]
        labels = [repr(tokenizer.decode([int(i)]))[1:-1] for i in raw]
        check_out_dir(args.out_dir)
        paths = draw(attention_maps(model, np.asarray(ids)), labels, args.out_dir)
    except (UserError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {len(paths)} attention maps ({len(labels)} tokens) to {args.out_dir}/")
    return 0


if __name__ == "__main__":
    run_command(main)
