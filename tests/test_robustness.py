"""Robust runs: bad input gets one clear line and exit 2, and no run ever loses work.

Everything here runs train.py and inference.py as a user would, as subprocesses from
the repository root, on tiny models (d_model 16, one block, 16-token context) and small
generated text files. The table of behaviours is docs/robustness.md.

    bad input       one line on stderr, no traceback, exit 2, no existing file touched
    never lose work SIGKILL mid-save, --resume, Ctrl-C, non-finite loss, malicious pickles
    see what's up   the wandb hooks and the progress bar (the metrics file and its plot:
                    tests/test_plot.py)
    fuzz            the data reader turns any bytes into text or a UserError
"""
import ctypes
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import pickle
import pty
import random
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.data import read_text
from transformer.errors import UserError
from transformer.state import load_state

REPO = Path(__file__).resolve().parent.parent
# One BLAS thread: on a busy two-core machine OpenBLAS's spinning threads make a tiny run
# several times slower, and none of these tests measures speed.
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
TINY = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "16",
        "--batch-size", "2", "--eval-iters", "1"]
WORDS = ("the module returns a list of values from the file path and raises an error when "
         "the string is not a number so call this function with care").split()
OLD_NS = 1_000_000_000 * 10**9  # 2001-09-09: any write to a protected file moves its mtime off this


def words(n, seed=0):
    """n words of plain English-like text: one cl100k token per word."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "\n"


def run(script, *args, env=None, timeout=120, **kwargs):
    """python script args..., from the repository root, output captured as text."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_one_line_error(result, pattern, code=2):
    """Exit `code`, exactly one line on stderr matching pattern, no traceback anywhere."""
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{out}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{result.stderr}"
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(*folders):
    """{path: (bytes, mtime_ns)} of every file under folders."""
    files = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                try:
                    content = path.read_bytes()
                except PermissionError:  # the chmod 000 file, when the tests do not run as root
                    content = None
                files[path] = (content, path.stat().st_mtime_ns)
    return files


def protect(path):
    """Give path an old mtime, so that rewriting it, even with the same bytes, shows."""
    os.utime(path, ns=(OLD_NS, OLD_NS))


def tensors_equal(a, b):
    """Same names, and every tensor bit-identical."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def step_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("Step:")]


def train_tiny(data, out, *extra):
    """A tiny training run that must succeed; returns its CompletedProcess."""
    result = run("train.py", "--data", data, "--out", out, *TINY, "--compact-vocab", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# ---- shared files ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained tiny checkpoint, its damaged variants, and good and bad text files."""
    d = tmp_path_factory.mktemp("inputs")
    f = {"dir": d / "folder", "missing": d / "missing.txt", "missing_ckpt": d / "missing.ckpt"}
    f["dir"].mkdir()
    f["data"] = d / "data.txt"
    f["data"].write_text(words(400))
    f["other_data"] = d / "other.txt"
    f["other_data"].write_text(words(400, seed=1))
    f["empty"] = d / "empty.txt"
    f["empty"].write_bytes(b"")
    f["latin1"] = d / "latin1.txt"
    f["latin1"].write_bytes(("café crème brûlée " * 50).encode("latin-1"))
    f["short_train"] = d / "short_train.txt"  # about 10 tokens: fewer than 17 in either split
    f["short_train"].write_text(words(10))
    f["short_valid"] = d / "short_valid.txt"  # about 60 tokens: enough to train on, under 17 to validate
    f["short_valid"].write_text(words(60))
    f["unreadable"] = d / "unreadable.txt"
    f["unreadable"].write_text(words(400))
    f["unreadable"].chmod(0)
    f["not_ckpt"] = d / "notes.ckpt"
    f["not_ckpt"].write_text("just some notes, not a model\n")

    f["good"] = d / "good.ckpt"
    train_tiny(f["data"], f["good"], "--max-iters", "2", "--eval-interval", "1")
    blob = f["good"].read_bytes()
    f["truncated"] = d / "truncated.ckpt"
    f["truncated"].write_bytes(blob[:len(blob) // 2])
    f["corrupted"] = d / "corrupted.ckpt"
    f["corrupted"].write_bytes(blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 0x40])
                               + blob[len(blob) // 2 + 1:])
    f["version9"] = d / "version9.ckpt"  # a valid file of a format version from the future
    version9 = blob.replace(b'"format_version":"2"', b'"format_version":"9"')  # the same length
    (digest,) = re.findall(rb'"sha256":"([0-9a-f]{64})"', version9)
    f["version9"].write_bytes(version9.replace(digest, hashlib.sha256(
        version9.replace(digest, b"0" * 64)).hexdigest().encode()))
    tensors, meta = load_checkpoint(f["good"])
    f["other_format"] = d / "other_format.ckpt"
    save_checkpoint(f["other_format"], {"w": np.zeros(3, np.float32)}, {"format": "someone-else"})
    f["no_optimizer"] = d / "weights_only.ckpt"  # what an export for inference would hold
    save_checkpoint(f["no_optimizer"], {k: v for k, v in tensors.items() if not k.startswith("adamw.")},
                    {**meta, "adamw": None})
    for path in d.iterdir():
        protect(path)
    return f


# ---- bad input: the table -------------------------------------------------------------

# --overwrite: the out fixture holds an earlier run's files, which the rows' failures must not touch
TRAIN_BASE = ["--data", "{data}", "--out", "{out}", "--overwrite", *TINY, "--compact-vocab", "--max-iters", "2",
              "--eval-interval", "1"]
RESUME_BASE = ["--data", "{data}", "--out", "{out}", "--resume"]
INFER_BASE = ["--ckpt", "{good}", "--max-new-tokens", "2", "--prompt", " the module"]
CUPY_MISSING = importlib.util.find_spec("cupy") is None

CUPY = r"--backend cupy cannot run: CuPy is not installed"
# (what is wrong with the checkpoint, its path, what stderr must say): for --resume and --ckpt alike
BAD_CHECKPOINTS = [
    ("missing", "{missing_ckpt}", r"missing\.ckpt does not exist"),
    ("directory", "{dir}", r"folder is a directory"),
    ("truncated", "{truncated}", r"corrupted or truncated"),
    ("corrupted", "{corrupted}", r"corrupted or truncated"),
    ("unknown-version", "{version9}", r"format version '9' but this code reads only version\(s\) 1, 2"),
    ("not-a-checkpoint", "{not_ckpt}",
     r"not a checkpoint of this project \(not a safetensors file\); pass a checkpoint written by train\.py"),
    ("other-format", "{other_format}",
     r"not of a nanograd-transformer model; pass a checkpoint written by train\.py"),
]
BAD_INPUT = [
    # (test id, script, arguments after the base ones, what stderr must say)
    ("data-missing", "train.py", ["--data", "{missing}"], r"missing\.txt does not exist"),
    ("data-empty-path", "train.py", ["--data", ""],  # issue 23.12: trained on the built-in corpus
     r"^error: --data is empty; give a UTF-8 text file, or leave out --data for the built-in corpus$"),
    ("data-directory", "train.py", ["--data", "{dir}"], r"folder is a directory"),
    ("data-unreadable", "train.py", ["--data", "{unreadable}"], r"cannot read .*Permission denied"),
    ("data-empty", "train.py", ["--data", "{empty}"], r"empty\.txt is empty"),
    ("data-not-utf8", "train.py", ["--data", "{latin1}"], r"is not valid UTF-8 .*convert it"),
    ("data-short-train-split", "train.py", ["--data", "{short_train}"],
     r"training split has \d tokens but context length 16 needs at least 17"),
    ("data-short-valid-split", "train.py", ["--data", "{short_valid}"],
     r"validation split has \d tokens but context length 16 needs at least 17"),
    ("d-model-not-divisible", "train.py", ["--d-model", "15"],
     r"--d-model \(15\) must be divisible by --num-heads \(2\)"),
    *[(f"{flag}-zero", "train.py", [f"--{flag}", "0"], rf"--{flag} must be a positive integer, got 0")
      for flag in ("d-model", "num-blocks", "num-heads", "batch-size", "context-length", "max-iters",
                   "eval-interval", "eval-iters")],
    ("max-iters-negative", "train.py", ["--max-iters", "-5"],
     r"--max-iters must be a positive integer, got -5"),
    ("dropout-one", "train.py", ["--dropout", "1.0"], r"--dropout must lie in \[0, 1\), got 1\.0"),
    ("dropout-negative", "train.py", ["--dropout", "-0.1"], r"--dropout must lie in \[0, 1\)"),
    ("learning-rate-zero", "train.py", ["--learning-rate", "0"], r"--learning-rate must be greater than 0"),
    ("learning-rate-negative", "train.py", ["--learning-rate", "-0.001"],
     r"--learning-rate must be greater than 0"),
    ("out-is-a-directory", "train.py", ["--out", "{dir}"],
     r"--out .*folder is a directory; give a file path such as"),
    ("out-inside-a-file", "train.py", ["--out", "{data}/model.ckpt"],
     r"--out .*data\.txt/model\.ckpt cannot be created because .*data\.txt is a file"),
    ("train-cupy-missing", "train.py", ["--backend", "cupy"], CUPY),
    ("wandb-missing", "train.py", ["--wandb"], r"--wandb needs the wandb package: pip install wandb"),
    ("sample-interval-negative", "train.py", ["--sample-interval", "-1"],
     r"--sample-interval must be 0 \(off\) or more, got -1\."),
    ("keep-best-with-save-interval", "train.py", ["--keep", "best", "--save-interval", "5"],
     r"--keep best saves at the evaluations that improve the validation loss; leave out --save-interval"),
    *[(f"resume-{what}", "train.py", RESUME_BASE + [path], message)
      for what, path, message in BAD_CHECKPOINTS],
    ("resume-no-optimizer-state", "train.py", RESUME_BASE + ["{no_optimizer}"], r"has no optimizer state"),
    ("resume-other-data", "train.py", RESUME_BASE + ["{good}", "--data", "{other_data}", "--max-iters", "3"],
     r"the data differs .*resume with the same --data"),
    *[(f"ckpt-{what}", "inference.py", ["--ckpt", path], message) for what, path, message in BAD_CHECKPOINTS],
    ("prompt-outside-vocabulary", "inference.py", ["--prompt", " zebra giraffe"],
     r"the prompt has \d+ token\(s\) the model never saw in training .*rephrase"),
    ("prompt-empty", "inference.py", ["--prompt", ""], r"--prompt is empty"),
    ("inference-cupy-missing", "inference.py", ["--backend", "cupy"], CUPY),
]


def command(script, row_args, f, out):
    base = TRAIN_BASE if script == "train.py" else INFER_BASE
    paths = {key: str(value) for key, value in f.items()} | {"out": str(out)}
    return [arg.format(**paths) for arg in base + row_args]


def drop_file_read_override():
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so that root, like everyone else, cannot read a chmod 000 file."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def out(tmp_path):
    """A previous run's checkpoint and metrics at --out, which a failed run must leave alone."""
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"\x89NGCKPT\n a previous run's checkpoint")
    (tmp_path / "out.metrics.jsonl").write_text('{"step": 0, "train_loss": 1.0, "valid_loss": 1.0}\n')
    protect(out)
    protect(tmp_path / "out.metrics.jsonl")
    return out


@pytest.mark.parametrize("name, script, row_args, message", BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input(files, out, name, script, row_args, message):
    kwargs = {}
    if name.endswith("cupy-missing") and not CUPY_MISSING:
        pytest.skip("CuPy is installed here; the no-device case is tested in-process below")
    if name == "data-unreadable" and os.geteuid() == 0:
        # chmod 000 does not stop root; take away the capability that lets it read anyway.
        try:
            subprocess.run(["true"], preexec_fn=drop_file_read_override, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"running as root without CAP_SETPCAP, so chmod 000 cannot be enforced ({e}); "
                        "the permission error is tested in-process in tests/test_data.py")
        kwargs["preexec_fn"] = drop_file_read_override
    env = {**ENV, "PYTHONPATH": str(out.parent / "no-wandb")} if name == "wandb-missing" else ENV
    if name == "wandb-missing" and importlib.util.find_spec("wandb") is not None:
        (out.parent / "no-wandb").mkdir()  # hide the installed one
        (out.parent / "no-wandb" / "wandb.py").write_text("raise ImportError('hidden by the test')\n")
    before = snapshot(files["data"].parent, out.parent)
    result = run(script, *command(script, row_args, files, out), env=env, **kwargs)
    assert_one_line_error(result, message)
    assert snapshot(files["data"].parent, out.parent) == before, "a failed run changed or created files"


def test_bad_input_baselines_succeed(files, out, tmp_path):
    """The table's base commands work, so each row fails because of its own argument only."""
    before = snapshot(files["data"].parent)
    result = run("train.py", *command("train.py", [], files, out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_state(out)[1]["step"] == 2
    result = run("train.py", *command("train.py", RESUME_BASE + ["{good}", "--max-iters", "3"], files, out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_state(out)[1]["step"] == 3
    result = run("inference.py", *command("inference.py", [], files, out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert snapshot(files["data"].parent) == before


def load_script(name):
    """train.py or inference.py as a module, to call main() in this process."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_under_test", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeRuntime:
    def __init__(self, count):
        self.count = count

    def getDeviceCount(self):
        if isinstance(self.count, Exception):
            raise self.count
        return self.count


@pytest.mark.parametrize("script", ["train.py", "inference.py"])
@pytest.mark.parametrize("runtime, message", [
    (FakeRuntime(0), r"--backend cupy cannot run: CuPy is installed but no CUDA device is visible\.$"),
    (FakeRuntime(RuntimeError("cudaErrorInsufficientDriver")),
     r"--backend cupy cannot run: CuPy is installed but the CUDA driver could not be reached "
     r"\(cudaErrorInsufficientDriver\)\.$"),
], ids=["no-device", "no-driver"])
def test_cupy_without_a_device(monkeypatch, capsys, tmp_path, script, runtime, message):
    """CuPy imports but finds no GPU: the one-line reason, exit 2, nothing written."""
    from types import SimpleNamespace

    import nanograd.backend as backend
    monkeypatch.setattr(backend, "cupy", SimpleNamespace(cuda=SimpleNamespace(runtime=runtime)))
    monkeypatch.chdir(tmp_path)
    code = load_script(script).main(["--backend", "cupy", "--out" if script == "train.py" else "--ckpt",
                                     str(tmp_path / "m.ckpt")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), captured.err
    assert list(tmp_path.iterdir()) == []


# ---- never lose work ------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_text(tmp_path_factory):
    """Text whose token ids reach about 16,000: without --compact-vocab the embedding and output
    layer get that many rows, so a checkpoint (weights and both AdamW moments) is about 25 MB
    and saving it takes tens of milliseconds."""
    from transformer.tokenizer import get_tokenizer
    tok = get_tokenizer()
    vocab = [w for w in (tok.decode([i]) for i in range(2000, 16000, 13))
             if w.startswith(" ") and w[1:].isalpha() and w.isascii()]
    rng = random.Random(0)
    text = "".join(rng.choice(vocab) for _ in range(800))
    assert max(tok.encode_ordinary(text)) > 15000
    path = tmp_path_factory.mktemp("wide") / "wide.txt"
    path.write_text(text)
    return path


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, wide_text):
    """Kill -9 the trainer while it writes <out>.tmp.<pid>: <out> still holds the previous,
    complete checkpoint, because the new one only ever replaces it by an atomic rename.

    On a busy machine a save may finish between seeing the temp file and the kill, so the
    trainer is first frozen (SIGSTOP): if the temp file is still there it is frozen mid-save
    and killed; if not, it is let go (SIGCONT) and the next save is tried."""
    out = tmp_path / "run.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--data", str(wide_text), "--out", str(out), "--d-model", "64",
         "--num-blocks", "1", "--num-heads", "2", "--context-length", "16", "--batch-size", "2",
         "--max-iters", "10000", "--eval-interval", "100000", "--eval-iters", "1", "--save-interval", "1"],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = Path(f"{out}.tmp.{proc.pid}")
    deadline, saves_seen, caught = time.monotonic() + 90, 0, False
    try:
        while not out.exists():  # the first complete checkpoint...
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.002)
        while not caught and saves_seen < 20:
            while not tmp.exists():  # ...then a later save begins
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, f"no save caught within 90 s ({saves_seen} seen)"
                time.sleep(0.0005)
            saves_seen += 1
            proc.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once it is frozen
            assert os.WIFSTOPPED(status), f"trainer ended instead (status {status})"
            caught = tmp.exists()  # frozen between creating the temp file and renaming it
            proc.send_signal(signal.SIGKILL if caught else signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert caught, f"{saves_seen} saves seen, none caught in the middle"
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists()  # the interrupted save's leftover (possibly still empty)
    tensors, meta = load_state(out)  # the previous checkpoint, whole
    assert 1 <= meta["step"] < 10000
    assert meta["adamw"]["t"] == meta["step"]
    assert all(np.isfinite(t).all() for t in tensors.values())


def without_time(meta):
    """meta with run.time_s left out: the seconds a run took differ between two runs."""
    return {**meta, "run": {k: v for k, v in meta["run"].items() if k != "time_s"}}


def test_resume_is_bit_identical(tmp_path, files):
    """6 steps straight == 3 steps, then --resume for 3 more: parameters, AdamW moments,
    step and the printed loss lines, with dropout on, so the random streams must line up."""
    common = ["--dropout", "0.2", "--eval-interval", "1"]
    straight = train_tiny(files["data"], tmp_path / "straight.ckpt", *common, "--max-iters", "6")
    first = train_tiny(files["data"], tmp_path / "part.ckpt", *common, "--max-iters", "3")
    assert load_state(tmp_path / "part.ckpt")[1]["step"] == 3
    rest = run("train.py", "--resume", tmp_path / "part.ckpt", "--data", files["data"], "--max-iters", "6")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "Resuming" in rest.stdout

    assert len(step_lines(straight.stdout)) == 6
    assert step_lines(first.stdout) + step_lines(rest.stdout) == step_lines(straight.stdout)
    a_tensors, a_meta = load_state(tmp_path / "straight.ckpt")
    b_tensors, b_meta = load_state(tmp_path / "part.ckpt")
    assert any(name.startswith("adamw.exp_avg.") for name in a_tensors)
    tensors_equal(a_tensors, b_tensors)
    assert without_time(a_meta) == without_time(b_meta)  # step, AdamW's t and hyperparameters, the run's settings
    assert a_meta["step"] == 6 and a_meta["adamw"]["t"] == 6

    # the metrics file continued where it left off
    def evaluations(path):
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(path)]
    assert evaluations(tmp_path / "part.metrics.jsonl") == evaluations(tmp_path / "straight.metrics.jsonl")


def test_ctrl_c_saves_and_resumes(tmp_path, files):
    """SIGINT after the first Step line: exit 130, a resume hint, a checkpoint at that step;
    resuming it to the end gives the parameters of an uninterrupted run."""
    steps = 300
    args = ["--dropout", "0.1", "--eval-interval", "1000", "--max-iters", str(steps)]
    out = tmp_path / "interrupted.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(files["data"]), "--out", str(out),
                             *TINY, "--compact-vocab", *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("Step: 0"):
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stdout = "".join(seen) + rest
    assert "Traceback" not in stdout + err, stdout + err
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{stdout}{err}"
    match = re.search(r"Interrupted after step (\d+); checkpoint saved to (.+)\. "
                      r"Resume with: python train\.py --resume (.+)$", stdout, re.M)
    assert match, stdout
    done = int(match[1])
    assert match[2] == match[3] == str(out)
    assert 1 <= done < steps
    assert load_state(out)[1]["step"] == done

    resumed = run("train.py", "--resume", out, "--data", files["data"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    train_tiny(files["data"], tmp_path / "straight.ckpt", *args)
    a_tensors, a_meta = load_state(tmp_path / "straight.ckpt")
    b_tensors, b_meta = load_state(out)
    tensors_equal(a_tensors, b_tensors)
    assert without_time(a_meta) == without_time(b_meta) and b_meta["step"] == steps


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, files):
    """Resume a good run with an absurd learning rate: the next step's parameters overflow, the
    run stops naming the step and the culprit, and the checkpoint it resumed is untouched."""
    ckpt = tmp_path / "good.ckpt"
    train_tiny(files["data"], ckpt, "--max-iters", "4", "--eval-interval", "2")
    protect(ckpt)
    before = snapshot(tmp_path)
    del before[tmp_path / "good.metrics.jsonl"]  # the resumed run appends its evaluations
    result = run("train.py", "--resume", ckpt, "--data", files["data"], "--learning-rate", "1e30",
                 "--max-iters", "20", "--save-interval", "0")  # 0: save only at the end
    line = assert_one_line_error(
        result, r"^error: at step \d+ (the gradient of \S+|the loss \(\S+\)) is not finite; "
                r"stopping \(the last good checkpoint .*good\.ckpt is kept\)", code=3)
    assert 4 < int(re.search(r"at step (\d+)", line)[1]) < 20
    after = snapshot(tmp_path)
    assert {p: after[p] for p in before} == before
    assert load_state(ckpt)[1]["step"] == 4


class Exploit:
    """Unpickling this opens (and so creates) the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_file(path, marker, container):
    if container == "torch.save":
        torch.save({"model": Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"model": Exploit(marker)}, protocol=int(container[-1])))


@pytest.mark.parametrize("container", ["pickle-protocol-0", "pickle-protocol-4", "torch.save"])
def test_malicious_pickle_is_refused(tmp_path, files, container):
    """A checkpoint that would run code when unpickled: refused, and the code never runs."""
    control = tmp_path / "control-marker"
    malicious_file(tmp_path / "control.pt", control, container)
    if container == "torch.save":
        torch.load(tmp_path / "control.pt", weights_only=False)
    else:
        pickle.loads((tmp_path / "control.pt").read_bytes())
    assert control.exists(), "the payload is live: loading it with pickle does create the marker"

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    malicious_file(evil, marker, container)
    for cmd in (["inference.py", "--ckpt", evil],
                ["train.py", "--resume", evil, "--data", files["data"], "--out", tmp_path / "new.ckpt"]):
        result = run(*cmd)
        assert_one_line_error(result, r"(looks like a PyTorch/pickle file|not a checkpoint of this project)")
        assert not marker.exists()
    assert not (tmp_path / "new.ckpt").exists()


# ---- see what is happening: wandb and the progress bar ---------------------------------

FAKE_WANDB = '''
"""A stand-in for wandb that records every call to $FAKE_WANDB_LOG, one JSON line each."""
import json, os

def _record(*call):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(call) + "\\n")

class Run:
    def log(self, data, step=None):
        _record("log", data, step)

    def finish(self):
        _record("finish")

def init(project=None, config=None, **kwargs):
    _record("init", project, config, kwargs)
    return Run()
'''


@pytest.mark.parametrize("project", [None, "my-project"])
def test_wandb_gets_config_losses_and_finish(tmp_path, files, project):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    env = {**ENV, "PYTHONPATH": str(fake), "FAKE_WANDB_LOG": str(log)}
    out = tmp_path / "m.ckpt"
    result = run("train.py", "--data", files["data"], "--out", out, *TINY, "--compact-vocab",
                 "--max-iters", "5", "--eval-interval", "2", "--wandb", *([project] if project else []),
                 env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["init", "log", "log", "log", "finish"]
    _, got_project, config, _ = calls[0]
    assert got_project == (project or "LLMZhang_lesson_2")
    assert {k: config[k] for k in ("d_model", "num_blocks", "num_heads", "context_length", "batch_size",
                                   "max_iters", "learning_rate", "dropout")} == {
        "d_model": 16, "num_blocks": 1, "num_heads": 2, "context_length": 16, "batch_size": 2,
        "max_iters": 5, "learning_rate": 1e-3, "dropout": 0.1}
    metrics = [json.loads(line) for line in open(tmp_path / "m.metrics.jsonl")]
    assert [c[2] for c in calls[1:4]] == [m["step"] for m in metrics] == [0, 2, 4]
    for (_, data, _), m in zip(calls[1:4], metrics):
        assert data == {"train_loss": m["train_loss"], "valid_loss": m["valid_loss"]}


BOOK_LINE = re.compile(r"^(Backend: numpy .*|Total: .* tokens .*|Model: .* parameters.*|"
                       r"Step: \d+, Training Loss: \d+\.\d{3}, Validation Loss: \d+\.\d{3}|"
                       r"Sample at step \d+: \".*\"|"  # and the lines of transformer/progress.py
                       r"step \d+/\d+: loss \d+\.\d{3}, \d+ ms/step, [\d,]+ tokens/s|"
                       r"Training complete in .*\. Model saved to .*)$")


def test_no_progress_bar_without_a_terminal(tmp_path, files):
    result = train_tiny(files["data"], tmp_path / "m.ckpt", "--max-iters", "20", "--eval-interval", "10")
    lines = result.stdout.splitlines()
    assert [line for line in lines if not BOOK_LINE.match(line)] == []
    assert len(step_lines(result.stdout)) == 3
    assert "\r" not in result.stdout and result.stderr == ""


def read_pty(master, proc, timeout=60):
    """Everything written to the terminal until the child exits."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("flag, rows_cols", [([], (24, 120)), ([], (0, 0)), (["--no-progress"], (24, 120))],
                         ids=["bar", "bar-unsized-terminal", "no-progress"])
def test_progress_bar_on_a_terminal(tmp_path, files, flag, rows_cols):
    """A terminal that reports 0 x 0 (e.g. `script` without a tty) still gets a visible bar."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *rows_cols, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "train.py", "--data", str(files["data"]),
                                 "--out", str(tmp_path / "m.ckpt"), *TINY, "--compact-vocab",
                                 "--max-iters", "20", "--eval-interval", "10", *flag],
                                cwd=REPO, env=ENV, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        text = read_pty(master, proc)
        assert proc.wait(timeout=60) == 0, text
    finally:
        os.close(master)
    assert "Traceback" not in text
    assert len([line for line in text.splitlines() if "Step: " in line]) == 3  # the book's lines stay
    bar = re.search(r"100%\|[^|]*\| 20/20 \[[^\]]*loss=\d+\.\d{3}, tokens_per_s=[\d,]+\]", text)
    if flag:
        assert bar is None and "%|" not in text, text
    else:
        assert bar, text


def test_ctrl_c_on_a_terminal_leaves_the_message_last(tmp_path, files):
    """Issue 13.7: after the "Interrupted" line, closing the bar redrew it below the message,
    with another loss; now the bar is closed first and the message is the last thing shown."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "train.py", "--data", str(files["data"]),
                                 "--out", str(tmp_path / "m.ckpt"), *TINY, "--compact-vocab",
                                 "--max-iters", "100000", "--eval-interval", "100000"],
                                cwd=REPO, env=ENV, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        seen, deadline = b"", time.monotonic() + 60
        while b"tokens_per_s" not in seen and time.monotonic() < deadline:  # the bar has drawn a step
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        text = seen.decode("utf-8", "replace") + read_pty(master, proc)
        assert proc.wait(timeout=60) == 130, text
    finally:
        os.close(master)
    assert "Traceback" not in text
    message = re.search(r"Interrupted after step (\d+); checkpoint saved to .*m\.ckpt\. Resume with: .*", text)
    assert message, text
    assert "%|" not in text[message.end():], repr(text[message.end():])
    bars = re.findall(r"\| (\d+)/100000 ", text[:message.start()])
    assert bars and int(bars[-1]) == int(message[1]), text  # the bar's last count is the saved step


# ---- fuzz: the data reader ------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.one_of(st.binary(max_size=200),
                      st.text(max_size=50).map(lambda s: s.encode("utf-8")),
                      st.text(st.sampled_from(" \t\r\n\x0b\x0c\x85\u2003\u3000"), max_size=8)
                      .map(lambda s: s.encode("utf-8")),  # blank text
                      st.text(max_size=50).map(lambda s: s.encode("utf-16")),
                      st.text(max_size=50).map(lambda s: s.encode("utf-8")[:-1])))  # maybe a cut character
@example(blob=b"")
@example(blob=b" \n\t")
@example(blob="é".encode("utf-8")[:1])
@example(blob="\ufeffhi".encode("utf-8"))
def test_fuzz_read_text(tmp_path, blob):
    """Any bytes: the text itself when it is non-blank UTF-8, else a UserError naming the file."""
    path = tmp_path / "fuzz.txt"
    path.write_bytes(blob)
    try:
        text = read_text(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        try:
            decoded = blob.decode("utf-8")
        except UnicodeDecodeError:
            return
        assert not decoded.strip(), "valid, non-blank UTF-8 was refused"
    else:
        assert isinstance(text, str) and text == blob.decode("utf-8") and text.strip()


@pytest.mark.parametrize("args", [["inference.py", "--max-new-tokens", "5"], ["train.py", "--help"]])
def test_closed_stdout_pipe_is_not_a_traceback(args, tmp_path):
    """`python inference.py ... | head -1`: the reader is gone; no traceback on stderr.

    The pipe's reading end is closed before the script starts, so its first
    write to stdout fails for certain (no race with a fast script)."""
    ckpt = tmp_path / "m.ckpt"
    from transformer import Model
    from transformer.state import save_state
    save_state(ckpt, Model(dict(d_model=16, num_blocks=1, num_heads=2, context_length=8, max_token_value=100277)))
    extra = ["--ckpt", str(ckpt)] if args[0] == "inference.py" else []
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:], *extra], stdout=write_end,
                          stderr=subprocess.PIPE, cwd=tmp_path, timeout=120)
    os.close(write_end)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == (1 if args[0] == "inference.py" else 0)  # argparse's help ignores the error


# ---- every integer flag at 10**12 (issue 23) ------------------------------------------------

BIG = 10**12
RUNS = "runs"  # finishes, exit 0, in bounded memory and time
ENDLESS = "endless"  # would run for ever: memory flat, and SIGTERM stops it within seconds, saved
# (command, flag) -> RUNS, ENDLESS, or the one line that refuses it.  Every integer flag of every
# command is a key (test_the_table_lists_every_integer_flag).
INTEGER_FLAGS = {
    ("train.py", "--d-model"): r"training with d_model 1000000000000, .* needs (at least )?about [\d.]+ [EZY]B of memory",
    ("train.py", "--num-blocks"): r"num_blocks 1000000000000, .* needs (at least )?about [\d.]+ [PEZY]B of memory",
    ("train.py", "--num-heads"): r"--d-model \(16\) must be divisible by --num-heads \(1000000000000\)",
    ("train.py", "--batch-size"): r"batch_size 1000000000000 .* needs (at least )?about [\d.]+ [PEZY]B of memory",
    ("train.py", "--context-length"): r"context_length 1000000000000, .* needs (at least )?about [\d.]+ [EZY]B of memory",
    ("train.py", "--max-iters"): ENDLESS,
    ("train.py", "--eval-interval"): RUNS,
    ("train.py", "--save-interval"): RUNS,
    ("train.py", "--warmup-iters"): RUNS,
    ("train.py", "--seed"): RUNS,
    ("train.py", "--sample-interval"): RUNS,
    ("inference.py", "--max-new-tokens"): r"generating 1000000000000 tokens .* needs about [\d.]+ TB of memory",
    ("inference.py", "--top-k"): RUNS,
    ("inference.py", "--seed"): RUNS,
    ("nanograd.gradcheck", "--seed"): RUNS,
}
# These two never finish their first evaluation or step, so they are driven by a test of their
# own: tests/test_outputs.py::test_a_count_of_10_to_the_12_streams_and_sigterm_stops_it_at_once.
STREAMED = {("train.py", "--eval-iters"), ("train.py", "--grad-accum-steps")}
PEAK_MB = 500  # a tiny run peaks near 80 MB (gradcheck, with torch, near 280): 10**12 of anything takes far more


class Parser(Exception):
    """Raised in place of parsing: carries the parser a command built."""


def integer_flags(command):
    """The flags of command's parser whose type is int (the parser caught before it parses)."""
    import argparse
    from unittest import mock

    def catch(parser, *args, **kwargs):
        raise Parser(parser)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(command.removesuffix(".py"))
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), pytest.raises(Parser) as caught:
        module.main([])
    return {flag for action in caught.value.args[0]._actions
            if action.type is int or getattr(action.type, "__name__", "") == "seed_type"  # gradcheck's bounded int
            for flag in action.option_strings}


@pytest.mark.parametrize("command", ["train.py", "inference.py", "transformer.convert", "transformer.plot",
                                     "transformer.inspect", "nanograd.gradcheck"])
def test_the_table_lists_every_integer_flag(command):
    """A new integer flag cannot slip past test_every_integer_flag_at_10_to_the_12."""
    listed = {flag for cmd, flag in INTEGER_FLAGS.keys() | STREAMED if cmd == command}
    assert integer_flags(command) == listed


def flag_command(command, flag, files, tmp_path):
    """argv of a tiny successful run of command, with flag set to 10**12."""
    if command == "train.py":
        argv = ["train.py", "--data", files["data"], "--out", tmp_path / "m.ckpt", *TINY, "--compact-vocab",
                "--max-iters", "3", "--eval-interval", "1", "--no-progress"]
    elif command == "inference.py":
        argv = ["inference.py", "--ckpt", files["good"], "--prompt", " the module", "--max-new-tokens", "5"]
    else:
        argv = ["-m", command]
    if flag in argv:
        del argv[argv.index(flag):argv.index(flag) + 2]
    return [sys.executable, *map(str, argv), flag, str(BIG)]


def stop_once_it_trains(pid, stdout_path, report):
    """on_start for run_measured: once training has gone 3 steps, sample the memory at two points
    5 s apart, then SIGTERM; report gets the two RSS values and when the signal went."""
    def steps():
        return len(step_lines(Path(stdout_path).read_text()))

    def rss_mb():
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    deadline = time.monotonic() + 120
    while steps() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    report["steps_before"], report["rss_before"] = steps(), rss_mb()
    time.sleep(5)
    report["steps_after"], report["rss_after"] = steps(), rss_mb()
    report["signalled"] = time.monotonic()
    os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("command, flag", list(INTEGER_FLAGS), ids=[f"{c}{f}" for c, f in INTEGER_FLAGS])
def test_every_integer_flag_at_10_to_the_12(files, tmp_path, run_measured, command, flag):
    """10**12 of anything is refused in one line (the memory check, with its estimate), or runs in
    bounded memory and time.  --max-iters 10**12 is a run that would take for ever, which is
    fine as long as it is bounded in the ways that matter: its memory does not grow with the
    steps, and SIGTERM stops it within seconds with its checkpoint saved."""
    expected = INTEGER_FLAGS[command, flag]
    argv = flag_command(command, flag, files, tmp_path)
    report = {}
    on_start = (lambda pid, out: stop_once_it_trains(pid, out, report)) if expected == ENDLESS else None
    result = run_measured(argv, timeout=180, cwd=REPO, env=ENV, on_start=on_start)
    assert not result.timed_out, f"{flag} {BIG} ran past 180 s"
    print(f"{command} {flag} {BIG}: exit {result.returncode}, peak {result.max_rss_mb:.0f} MB, {result.seconds:.1f} s {report}")
    assert result.max_rss_mb < PEAK_MB, f"{flag} {BIG}: peak {result.max_rss_mb:.0f} MB"
    if expected == RUNS:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    elif expected == ENDLESS:
        assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
        assert report["steps_after"] > report["steps_before"], report  # it was training all along
        assert report["rss_after"] - report["rss_before"] < 20, report  # in MB: flat, not growing with steps
        assert result.ended - report["signalled"] < 10, "SIGTERM took more than 10 s to stop it"
        done = int(re.search(r"Interrupted by SIGTERM after step (\d+); checkpoint saved", result.stdout).group(1))
        assert load_state(tmp_path / "m.ckpt")[1]["step"] == done
    else:
        assert_one_line_error(result, expected)
        assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("knob", [["--temperature", "1e-310"], ["--temperature", "5e-324"],
                                  ["--repetition-penalty", "1e-320"], ["--repetition-penalty", "5e-324"]])
def test_a_temperature_or_penalty_that_overflows_is_its_limit(files, knob):
    """Issue 23.8: `inference.py --temperature 1e-310` (or --repetition-penalty 1e-320) printed
    numpy's overflow warnings and repeated token 0 (exit 0), while 1e-300, which does not overflow,
    gave the greedy text.  Now each gives what 1e-300 gives, silently."""
    base = ["--ckpt", files["good"], "--prompt", " the module returns", "--max-new-tokens", "8"]
    limit = ["--temperature", "1e-300"] if knob[0] == "--temperature" else ["--repetition-penalty", "1e-300"]
    if knob[0] == "--repetition-penalty":
        base += ["--temperature", "0"]
    expected = run("inference.py", *base, *limit)
    result = run("inference.py", *base, *knob)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.split("---------------")[1] == expected.stdout.split("---------------")[1]
    if knob[0] == "--temperature":
        greedy = run("inference.py", *base, "--temperature", "0")
        assert result.stdout.split("---------------")[1] == greedy.stdout.split("---------------")[1]
