"""Draw the loss curves of a run from the metrics file train.py writes beside its checkpoint.

    python -m transformer.plot model/model.metrics.jsonl                 # -> model/model.metrics.png
    python -m transformer.plot model/model.metrics.jsonl --out loss.png

Each line of the metrics file is one evaluation: {"step", "train_loss", "valid_loss",
["valid_full_loss"], "lr", "time_s"}. Training loss, validation loss and (when the run
used --eval-full) the full validation loss are drawn against the step. A run resumed from
an earlier checkpoint appends evaluations it may already have made; the later one wins.
matplotlib is imported only here, so training never needs it.
"""
import json
import math
import os
import sys

from .errors import OneLineParser, UserError, run_command
from .outputs import check_png_output, replacing, same_file
from .validate import is_real, read_file

METRICS_BYTES_PER_BYTE = 40  # a 60-byte JSON line becomes a dict of a few floats: about 1 kB

CURVES = (("train_loss", "training loss (estimate)"),
          ("valid_loss", "validation loss (estimate)"),
          ("valid_full_loss", "validation loss (full split)"))


def read_metrics(path):
    """The evaluations in path, one dict per step, sorted by step; UserError if unusable."""
    if not os.path.exists(path):
        raise UserError(f"metrics file {path} does not exist; train.py writes <checkpoint>.metrics.jsonl "
                        "beside the checkpoint")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the .metrics.jsonl file inside it")
    try:
        raw = read_file(path, "metrics file", per_byte=METRICS_BYTES_PER_BYTE)  # never a FIFO or a device
    except OSError as e:
        raise UserError(f"cannot read metrics file {path} ({e.strerror}); check its permissions") from e
    by_step = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number} of metrics file {path}"
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UserError(f"{where} is not JSON; is this a metrics file written by train.py?") from None
        if not isinstance(record, dict) or not _is_step(record.get("step")) \
                or not all(_is_number(record.get(key)) for key in ("train_loss", "valid_loss")):
            raise UserError(f"{where} lacks a step, train_loss or valid_loss; "
                            "is this a metrics file written by train.py?")
        by_step[record["step"]] = record  # a resumed run re-evaluates a step: the later record wins
    if not by_step:
        raise UserError(f"metrics file {path} holds no evaluations yet; train longer than one "
                        "--eval-interval, then plot")
    return [by_step[step] for step in sorted(by_step)]


def _is_step(value):
    """A step number matplotlib can place: an int in [0, 2**53), exact as a float."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _is_number(value):
    """A loss: an int or float (NaN and infinities too, drawn as gaps) that converts to a float."""
    return is_real(value) or isinstance(value, float)


def plot(records, out, title=None):
    """Draw each curve present in records against step and save a PNG to out."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib "
                        "(or pip install -e '.[plot]')") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for key, label in CURVES:
            points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        finite = [r[k] for r in records for k, _ in CURVES if _is_number(r.get(k)) and math.isfinite(r[k])]
        if not finite:
            raise UserError("every loss in the metrics file is NaN or infinite; nothing to draw")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats)")
        ax.set_title(title or "loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with replacing(out) as tmp:  # written whole, then renamed: a failed write leaves out alone
                fig.savefig(tmp, format="png")
        except OSError as e:
            raise UserError(f"cannot write {out} ({e.strerror}); check that its folder exists "
                            "and is writable") from e
    finally:
        plt.close(fig)


def check_out(out, metrics):
    """UserError unless writing the PNG to out replaces nothing but an earlier PNG."""
    if same_file(out, metrics):
        raise UserError(f"--out {out} is the metrics file itself; choose another path such as "
                        f"{default_out(metrics)}")
    check_png_output(out, "--out", doing="plotting")


def default_out(metrics_path):
    """model/model.metrics.jsonl -> model/model.metrics.png"""
    base, ext = os.path.splitext(metrics_path)
    return (base if ext == ".jsonl" else metrics_path) + ".png"


def main(argv=None):
    parser = OneLineParser(prog="python -m transformer.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="the .metrics.jsonl file written by train.py")
    parser.add_argument("--out", default=None, help="PNG to write (default: beside the metrics file)")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.metrics)
    try:
        records = read_metrics(args.metrics)
        check_out(out, args.metrics)
        plot(records, out, title=os.path.basename(args.metrics))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first, last = records[0]["step"], records[-1]["step"]
    print(f"Plotted {len(records)} evaluations (steps {first} to {last}) to {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
