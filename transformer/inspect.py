"""Draw every attention head's weights for a prompt: one PNG per head, as the book's notebook, and an overview.

    python -m transformer.inspect --prompt "Return the number of items" --out-dir attention/

Each image is the (T, T) softmax matrix of one head: row t shows how much
position t attends to each earlier position (the upper triangle is the
causal mask, always 0).  overview.png sets them all on one grid, a row per
block and a column per head.  Needs matplotlib: pip install matplotlib.
"""
import os
import re
import sys
import warnings

import numpy as np

from nanograd.backend import BackendError, get_backend, to_host

from .errors import OneLineParser, UserError, run_command
from .outputs import DEFAULT_OUT, check_default_folder, check_png_output, replacing
from .state import build_model, load_state
from .tokenizer import decode, encode_prompt, run_tokenizer
from .validate import check_inspect_memory


def attention_maps(model, ids):
    """Every block's attention weights for ids (T,): a list of (NH, T, T) host arrays."""
    model.eval()
    model(ids[None])  # the forward keeps each block's softmax weights in its cache
    return [to_host(block.attn.att[0]) for block in model.cache.blocks]


OVERVIEW = "overview.png"  # the grid of every block and head, beside the one-per-head PNGs
OVERVIEW_DPI = 100
HEAD_DPI = 100
LABELLED_TOKENS = 48  # a label per token up to this many; beyond, labels smear and the images stop growing
OVERVIEW_PIXELS = 8 * 10**6  # the overview's cells shrink to keep it within this (about 250 MB to draw)


def head_inches(T):
    """(width, height) of one head's figure: grows with T until the labels stop (about 1600 x 1500 pixels)."""
    size = max(4.0, 0.28 * min(T, LABELLED_TOKENS) + 1.5)
    return size + 1, size


def overview_inches(NB, NH, T):
    """(cell, width, height): a square panel per block and head, 2 to 4 inches as T grows,
    smaller when that many panels would pass OVERVIEW_PIXELS."""
    cell = min(4.0, max(2.0, 0.1 * T + 1.0))
    cell = min(cell, (OVERVIEW_PIXELS / (NB * NH)) ** 0.5 / OVERVIEW_DPI)
    return cell, cell * NH + 1.6, cell * NB + 0.8


def image_pixels(NB, NH, T):
    """Pixels of the largest image draw() makes, for the memory estimate."""
    head_w, head_h = head_inches(T)
    _, width, height = overview_inches(NB, NH, T)
    return max(head_w * head_h * HEAD_DPI**2, width * height * OVERVIEW_DPI**2)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a UserError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing attention maps needs matplotlib: pip install matplotlib") from None
    # a token its font cannot draw (Chinese in DejaVu Sans) becomes a box, not lines of warnings
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
    return plt


def overview_figure(maps, labels):
    """One figure with every map on a grid: a row per block, a column per head, each cell a (T, T) map.

    Token labels go on the left column and the bottom row while they can be read (T <= 32).
    """
    plt = pyplot()
    NB, NH, T = len(maps), maps[0].shape[0], len(labels)
    _, width, height = overview_inches(NB, NH, T)
    fig, axes = plt.subplots(NB, NH, figsize=(width, height), squeeze=False, layout="constrained")
    for i, heads in enumerate(maps):
        for h, att in enumerate(heads):
            ax = axes[i, h]
            image = ax.imshow(att, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"block {i}, head {h}", fontsize=9)
            ticks = range(T) if T <= 32 else []  # beyond that, a tick per token is a smear
            ax.set_xticks(ticks, labels if ticks and i == NB - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(ticks, labels if ticks and h == 0 else [], fontsize=6)
            if i == NB - 1:
                ax.set_xlabel("attends to (key)", fontsize=8)
            if h == 0:
                ax.set_ylabel("position (query)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(f"attention weights, {T} tokens: rows are blocks, columns are heads")
    return fig


def map_paths(NB, NH, out_dir):
    """Where draw() writes: block<i>_head<h>.png for each block and head, then OVERVIEW."""
    heads = [os.path.join(out_dir, f"block{i}_head{h}.png") for i in range(NB) for h in range(NH)]
    return heads + [os.path.join(out_dir, OVERVIEW)]


def draw(maps, labels, out_dir):
    """One PNG per block and head, and OVERVIEW with all of them; returns the per-head paths."""
    plt = pyplot()
    NH, T = maps[0].shape[0], len(labels)
    paths = map_paths(len(maps), NH, out_dir)[:-1]
    ticks = range(T) if T <= LABELLED_TOKENS else []  # beyond, a label per token is a smear
    for k, path in enumerate(paths):
        i, h = divmod(k, NH)
        fig, ax = plt.subplots(figsize=head_inches(T))
        image = ax.imshow(maps[i][h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(ticks, labels if ticks else [], rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels if ticks else [], fontsize=7)
        ax.set_xlabel("attends to (key)")
        ax.set_ylabel("position (query)")
        ax.set_title(f"block {i}, head {h}")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        save_png(plt, fig, path, dpi=HEAD_DPI)
    save_png(plt, overview_figure(maps, labels), os.path.join(out_dir, OVERVIEW), dpi=OVERVIEW_DPI)
    return paths


def check_map_paths(paths, inputs):
    """UserError unless every image can be written, before any is: each a PNG or nothing yet."""
    for path in paths:
        check_png_output(path, "", inputs=inputs)


def older_maps(out_dir, paths):
    """The block<i>_head<h>.png files in out_dir that this run does not write (another model's)."""
    ours = {os.path.basename(p) for p in paths}
    return sorted(n for n in os.listdir(out_dir) if re.fullmatch(r"block\d+_head\d+\.png", n) and n not in ours)


def save_png(plt, fig, path, dpi):
    """Write fig to path through a temporary file and a rename (a link there is replaced, not followed)."""
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose another --out-dir") from e
    finally:
        plt.close(fig)


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
    parser.add_argument("--ckpt", default=DEFAULT_OUT,
                        help="checkpoint to read, as train.py writes it")
    parser.add_argument("--prompt", default="Return the number of items in the list.",
                        help="text whose attention is drawn; only its last context_length tokens are used")
    parser.add_argument("--out-dir", default="attention",
                        help=f"folder for the PNGs: block<i>_head<h>.png per head, and {OVERVIEW} with them all")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="array library the model runs on (cupy needs a GPU)")
    args = parser.parse_args(argv)
    try:
        get_backend(args.backend)
        check_default_folder(args.ckpt)
        tensors, meta = load_state(args.ckpt)
        model = build_model(tensors, meta, backend=args.backend)
        tokenizer = run_tokenizer(meta["run"])
        ids = encode_prompt(args.prompt, tokenizer, tensors.get("vocab"), meta["h_params"]["max_token_value"])
        ids = ids[-model.context_length:]
        raw = ids if "vocab" not in tensors else tensors["vocab"][ids]
        labels = [repr(decode(tokenizer, [int(i)]))[1:-1] for i in raw]
        h = meta["h_params"]
        check_inspect_memory(h, model.dtype, len(ids), image_pixels(h["num_blocks"], h["num_heads"], len(ids)))
        check_out_dir(args.out_dir)
        check_map_paths(map_paths(h["num_blocks"], h["num_heads"], args.out_dir), inputs=[args.ckpt])
        paths = draw(attention_maps(model, np.asarray(ids)), labels, args.out_dir)
    except (UserError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {len(paths)} attention maps ({len(labels)} tokens) and {OVERVIEW}, all on one grid, "
          f"to {args.out_dir}/")
    older = older_maps(args.out_dir, paths)
    if older:
        print(f"Note: {args.out_dir}/ also holds {len(older)} older map(s) this model has no block or head for "
              f"({', '.join(older[:3])}{', ...' if len(older) > 3 else ''}); they are another model's, "
              "not this one's")
    return 0


if __name__ == "__main__":
    run_command(main)
