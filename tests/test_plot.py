"""See what is happening: the metrics file train.py writes, and `python -m transformer.plot`."""
import json
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.errors import UserError
from transformer.plot import default_out, plot, read_metrics

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORDS = ("the module returns a list of values from the file path and raises an error when "
         "the string is not a number so call this function with care").split()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(stdout, metrics path) of a tiny 7-step run that evaluates at steps 0, 2, 4 and 6."""
    d = tmp_path_factory.mktemp("run")
    rng = random.Random(0)
    (d / "data.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    result = run("train.py", "--data", d / "data.txt", "--out", d / "model.ckpt", "--d-model", "16",
                 "--num-blocks", "1", "--num-heads", "2", "--context-length", "16", "--batch-size", "2",
                 "--eval-iters", "1", "--compact-vocab", "--max-iters", "7", "--eval-interval", "2",
                 "--eval-full")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, d / "model.metrics.jsonl"


def test_metrics_file_records_every_evaluation(trained):
    """One JSON line per evaluation, beside the checkpoint, agreeing with the printed lines."""
    stdout, path = trained
    records = [json.loads(line) for line in path.read_text().splitlines()]
    printed = re.findall(r"Step: (\d+), Training Loss: ([\d.]+), Validation Loss: ([\d.]+), "
                         r"Full Validation Loss: ([\d.]+)", stdout)
    assert [r["step"] for r in records] == [int(p[0]) for p in printed] == [0, 2, 4, 6]
    for record, (_, train, valid, full) in zip(records, printed):
        assert set(record) == {"step", "lr", "time_s", "train_loss", "valid_loss", "valid_full_loss"}
        assert (f"{record['train_loss']:.3f}", f"{record['valid_loss']:.3f}",
                f"{record['valid_full_loss']:.3f}") == (train, valid, full)
        assert record["lr"] == 1e-3
    assert [r["time_s"] for r in records] == sorted(r["time_s"] for r in records)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    blob = Path(path).read_bytes()
    assert blob[:8] == PNG_SIGNATURE, "not a PNG"
    assert blob[12:16] == b"IHDR"
    assert blob[-8:-4] == b"IEND", "PNG is cut short"
    return struct.unpack(">II", blob[16:24])


def test_plot_writes_a_png(trained, tmp_path):
    _, metrics = trained
    out = tmp_path / "loss.png"
    result = run("-m", "transformer.plot", metrics, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert f"Plotted 4 evaluations (steps 0 to 6) to {out}" in result.stdout
    assert out.stat().st_size > 5000
    assert png_size(out) == (800, 500)


@pytest.mark.parametrize("full", [True, False], ids=["with-full-loss", "without"])
def test_plot_draws_each_curve(trained, tmp_path, monkeypatch, full):
    """The axes hold one line per loss in the file, at the file's steps and values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made, subplots = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(subplots(*a, **k)) or made[-1])
    records = read_metrics(str(trained[1]))
    if not full:
        records = [{k: v for k, v in r.items() if k != "valid_full_loss"} for r in records]
    plot(records, str(tmp_path / "loss.png"))
    ax = made[0][1]
    keys = ["train_loss", "valid_loss"] + (["valid_full_loss"] if full else [])
    assert [line.get_label() for line in ax.lines] == [
        "training loss (estimate)", "validation loss (estimate)", "validation loss (full split)"][:len(keys)]
    for line, key in zip(ax.lines, keys):
        assert list(line.get_xdata()) == [0, 2, 4, 6]
        assert list(line.get_ydata()) == [r[key] for r in records]
    assert png_size(tmp_path / "loss.png") == (800, 500)


def test_plot_default_out_is_beside_the_metrics(tmp_path):
    metrics = tmp_path / "run.metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train_loss": 5 - s / 10, "valid_loss": 5.2 - s / 12})
                               + "\n" for s in range(0, 30, 5)))
    assert default_out(str(metrics)) == str(tmp_path / "run.metrics.png")
    result = run("-m", "transformer.plot", metrics)
    assert result.returncode == 0, result.stdout + result.stderr
    assert png_size(tmp_path / "run.metrics.png") == (800, 500)


def test_a_resumed_run_s_repeated_steps_keep_the_later_record(tmp_path):
    """A run killed after evaluating step 4 but before saving it, then resumed, logs step 4 twice."""
    path = tmp_path / "m.metrics.jsonl"
    lines = [{"step": 0, "train_loss": 9.0, "valid_loss": 9.1},
             {"step": 4, "train_loss": 8.0, "valid_loss": 8.1},
             {"step": 4, "train_loss": 7.0, "valid_loss": 7.1},
             {"step": 2, "train_loss": 8.5, "valid_loss": 8.6}]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    records = read_metrics(str(path))
    assert [(r["step"], r["train_loss"]) for r in records] == [(0, 9.0), (2, 8.5), (4, 7.0)]


BAD_METRICS = [
    # (test id, file contents or a kind of path, what stderr must say)
    ("missing", None, r"missing\.jsonl does not exist"),
    ("directory", "dir", r"is a directory"),
    ("empty", b"", r"holds no evaluations yet"),
    ("blank-lines", b"\n  \n", r"holds no evaluations yet"),
    ("not-json", b'{"step": 0, "train_loss": 1.0, "valid_loss": 1.0}\nnot json\n',
     r"line 2 of .* is not JSON"),
    ("not-utf8", b"\xff\xfe\x00garbage\n", r"line 1 of .* is not JSON"),
    ("json-list", b"[1, 2, 3]\n", r"line 1 of .* lacks a step, train_loss or valid_loss"),
    ("no-valid-loss", b'{"step": 0, "train_loss": 1.0}\n', r"lacks a step, train_loss or valid_loss"),
    ("string-step", b'{"step": "0", "train_loss": 1.0, "valid_loss": 1.0}\n', r"lacks a step"),
    ("all-nan", b'{"step": 0, "train_loss": NaN, "valid_loss": NaN}\n', r"every loss .* is NaN or infinite"),
]


@pytest.mark.parametrize("name, contents, message", BAD_METRICS, ids=[row[0] for row in BAD_METRICS])
def test_plot_bad_metrics_file(tmp_path, name, contents, message):
    path = tmp_path / ("missing.jsonl" if contents is None else "m.metrics.jsonl")
    if contents == "dir":
        path.mkdir()
    elif contents is not None:
        path.write_bytes(contents)
    result = run("-m", "transformer.plot", path, "--out", tmp_path / "loss.png")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert not (tmp_path / "loss.png").exists()


def test_plot_unwritable_out(trained, tmp_path):
    result = run("-m", "transformer.plot", trained[1], "--out", tmp_path / "no" / "such" / "dir" / "loss.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(r"error: cannot write .*loss\.png \(No such file or directory\); .*\n", result.stderr)


def test_plot_without_matplotlib(trained, tmp_path):
    """matplotlib hidden behind a stub that fails to import, as if it were not installed."""
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    result = run("-m", "transformer.plot", trained[1], "--out", tmp_path / "loss.png",
                 env={**ENV, "PYTHONPATH": str(stub.parent)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("error: plotting needs matplotlib: pip install matplotlib "
                             "(or pip install -e '.[plot]')\n")
    assert not (tmp_path / "loss.png").exists()


def test_plot_bad_flag_is_one_line():
    result = run("-m", "transformer.plot")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "the following arguments are required: metrics" in result.stderr


def test_read_metrics_raises_only_user_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 0, "train_loss": 1.0, "valid_loss": 1.0}\n{"step": -1}\n')
    with pytest.raises(UserError, match="line 2"):
        read_metrics(str(path))


@pytest.mark.parametrize("line", [
    b'{"step": 0, "train_loss": 1' + b"0" * 400 + b', "valid_loss": 1.0}',  # an int no float can hold
    b'{"step": 1' + b"0" * 30 + b', "train_loss": 1.0, "valid_loss": 1.0}',  # past float's exact ints
], ids=["loss-overflows-float", "step-past-2**53"])
def test_numbers_a_plot_cannot_hold_are_refused(tmp_path, line):
    """JSON ints are unbounded: 10**400 used to pass the reader and crash the plot (OverflowError)."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(UserError, match=r"^line 1 of metrics file .* lacks a step, train_loss or valid_loss"):
        read_metrics(str(path))


@pytest.mark.parametrize("case", ["the-metrics-file", "a-hard-link-to-it", "a-checkpoint", "a-fifo"])
def test_plot_never_replaces_its_input_or_another_file(trained, tmp_path, case):
    """Issue 16.2: `--out m.metrics.jsonl` replaced the metrics with a PNG; an existing file that
    is not an earlier plot, or a FIFO or device, is refused the same way: one line, exit 2."""
    metrics = tmp_path / "m.metrics.jsonl"
    metrics.write_bytes(trained[1].read_bytes())
    out = {"the-metrics-file": metrics, "a-hard-link-to-it": tmp_path / "link.png",
           "a-checkpoint": tmp_path / "m.ckpt", "a-fifo": tmp_path / "fifo.png"}[case]
    if case == "a-hard-link-to-it":
        os.link(metrics, out)
    elif case == "a-checkpoint":
        out.write_bytes(b"\x89NGCKPT\n a checkpoint")
    elif case == "a-fifo":
        os.mkfifo(out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = run("-m", "transformer.plot", metrics, "--out", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = {"the-metrics-file": r"is the metrics file itself; choose another path such as .*m\.metrics\.png",
               "a-hard-link-to-it": r"is the metrics file itself",
               "a-checkpoint": r"m\.ckpt exists and is not a PNG; plotting would replace it",
               "a-fifo": r"fifo\.png is not a regular file"}[case]
    assert re.fullmatch(rf"error: --out .*{message}.*\n", result.stderr), result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, *(["fifo.png"] if case == "a-fifo" else [])])


def test_plot_replaces_an_earlier_plot(trained, tmp_path):
    out = tmp_path / "loss.png"
    for _ in range(2):
        result = run("-m", "transformer.plot", trained[1], "--out", out)
        assert result.returncode == 0, result.stderr
    png_size(out)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temp file left
