"""transformer/validate.py: whatever comes from disk or from a size flag is checked before use.

    crafted checkpoints  a real checkpoint with one field changed and its SHA-256 recomputed,
                         so only validation can catch it: refused in one line (CheckpointError)
    entry points         the same files through inference.py, train.py --resume, convert and
                         inspect, as subprocesses with a timeout (the worst ones used to hang)
    special files        FIFOs and devices are refused before a byte is read
    sizes from flags     settings whose memory exceeds the machine's are refused, with the estimate
    fuzz                 random field mutations: only the one-line error, never past the memory budget

The memory budget is pinned with $NANOGRAD_MEMORY_LIMIT, so the refusals do not depend on
how much memory the test machine has (and a regression cannot take all of it).
"""
import hashlib
import json
import math
import os
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nanograd import AdamW
from transformer import Model, validate
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.errors import CheckpointError, UserError
from transformer.model import parameter_shapes
from transformer.state import build_model, load_state, restore_optimizer, save_state
from transformer.tokenizer import decode, encode_prompt, get_tokenizer

REPO = Path(__file__).resolve().parent.parent
LIMIT = 2 * 10**9  # the memory every test here may plan for
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       validate.MEMORY_LIMIT_ENV: str(LIMIT)}
V = 60  # the tiny model's vocabulary: the first 60 ids of vocab below
H = dict(d_model=16, num_blocks=1, num_heads=2, batch_size=2, context_length=16, max_iters=20,
         learning_rate=1e-3, dropout=0.0, eval_interval=10, eval_iters=2, seed=1337, max_token_value=V)
RUN = {**{k: v for k, v in H.items() if k != "max_token_value"}, "dtype": "float32", "data": "data.txt",
       "save_interval": 10, "lr_schedule": "constant", "warmup_iters": 0, "min_lr": 0.0, "grad_clip": 0.0,
       "grad_accum_steps": 1, "eval_full": False, "compact_vocab": True, "data_sha256": "ab" * 32}
BIAS = "transformer_blocks.0.ln1.bias"  # a (16,) float32 tensor


@pytest.fixture(autouse=True)
def memory_limit(monkeypatch):
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, str(LIMIT))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint as train.py --compact-vocab writes it after one step of S (see the module doc)."""
    path = tmp_path_factory.mktemp("good") / "good.ckpt"
    model = Model(H, seed=1)
    opt = AdamW(model.params)
    x = np.random.default_rng(0).integers(0, V, (2, 16))  # (B, T)
    model(x, x)
    opt.step(model.backward())
    save_state(path, model, opt, step=1, run=RUN, vocab=np.arange(V) * 7 + 3)
    return path


def set_field(header, dotted, value):
    """header['meta'][a][b]... = value for dotted 'a.b'."""
    *parents, last = dotted.split(".")
    node = header["meta"]
    for key in parents:
        node = node[key]
    node[last] = value


def rewrite_header(src, dst, edit):
    """Copy checkpoint src to dst with edit(header) applied to its safetensors header, seen as
    {"meta": the metadata's values decoded, "tensors": the entries}; checksum recomputed."""
    blob = Path(src).read_bytes()
    (length,) = struct.unpack_from("<Q", blob)
    entries = json.loads(blob[8:8 + length])
    metadata = entries.pop("__metadata__")
    header = {"meta": {k: json.loads(v) for k, v in metadata.items() if k not in ("sha256", "format_version")},
              "tensors": entries}
    edit(header)
    metadata = {"sha256": "0" * 64, "format_version": "2", **{k: json.dumps(v) for k, v in header["meta"].items()}}
    new = json.dumps({"__metadata__": metadata, **header["tensors"]}, separators=(",", ":")).encode()
    body = struct.pack("<Q", len(new)) + new + blob[8 + length:]
    Path(dst).write_bytes(body.replace(b"0" * 64, hashlib.sha256(body).hexdigest().encode(), 1))


def meta_edit(**fields):
    """An edit setting each dotted meta field (h_params__dropout -> h_params.dropout)."""
    def edit(header):
        for dotted, value in fields.items():
            set_field(header, dotted.replace("__", "."), value)
    return edit


def entry_edit(name, **changes):
    def edit(header):
        header["tensors"][name].update(changes)
    return edit


def tensor_edit(name, value):
    """A (tensors, meta) edit that replaces (or with None removes) one tensor."""
    def edit(tensors, meta):
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value(tensors.get(name)) if callable(value) else value
    return edit


def vocab_edit(change):
    """A (tensors, meta) edit that replaces the vocab list v with change(v)."""
    def edit(tensors, meta):
        meta["vocab"] = change(meta["vocab"])
    return edit


def craft(good, dst, edit):
    """Write a crafted copy of good at dst: a header edit, or a (tensors, meta) edit."""
    if edit.__code__.co_argcount == 1:
        rewrite_header(good, dst, edit)
    else:
        tensors, meta = load_checkpoint(good)
        edit(tensors, meta)
        save_checkpoint(dst, tensors, meta)
    return dst


# (test id, edit, what the one line must say). Each used to be a traceback, a hang or a silent error.
CRAFTED = [
    ("shape-70-dims", entry_edit(BIAS, shape=[1] * 69 + [16]), r"has a shape of 70 dimensions, beyond 32"),
    ("shape-2**70-elements", entry_edit(BIAS, shape=[2**70, 0], data_offsets=[0, 0]), r"not a valid safetensors file"),
    ("num-blocks-10**7", meta_edit(h_params__num_blocks=10**7, run__num_blocks=10**7),
     r"holds 21 parameter tensors but its h_params describe 160000005"),
    ("context-length-10**8", meta_edit(h_params__context_length=10**8, run__context_length=10**8),
     r"context_length 100000000.* needs about \d+\.\d GB of memory"),
    ("d-model-odd-heads", meta_edit(h_params__num_heads=3, run__num_heads=3), r"divisible by num_heads"),
    ("dropout-string", meta_edit(h_params__dropout="0.1", run__dropout="0.1"),
     r"unusable h_params: dropout must be a number in \[0, 1\), got '0\.1'"),
    ("dropout-null", meta_edit(h_params__dropout=None), r"dropout must be a number in \[0, 1\), got None"),
    ("dropout-nan", meta_edit(h_params__dropout=math.nan), r"dropout must be a number"),
    ("max-token-value-bool", meta_edit(h_params__max_token_value=True), r"max_token_value must be a positive"),
    ("dtype-foo", meta_edit(dtype="foo"), r"has dtype 'foo'; it must be float32 or float64"),
    ("dtype-empty", meta_edit(dtype=""), r"has dtype ''"),
    ("dtype-number", meta_edit(dtype=5), r"has dtype 5"),
    ("dtype-list", meta_edit(dtype=["float32"]), r"has dtype \['float32'\]"),
    ("step-negative", meta_edit(step=-1), r"malformed step \(-1\)"),
    ("step-float", meta_edit(step=1.5), r"malformed step"),
    ("adamw-t-nan", meta_edit(adamw__t=math.nan), r"adamw\.t must be an integer, 0 or more, got nan"),
    ("adamw-t-inf", meta_edit(adamw__t=math.inf), r"adamw\.t must be .*got inf"),
    ("adamw-t-negative", meta_edit(adamw__t=-1), r"adamw\.t must be .*got -1"),
    ("adamw-t-not-step", meta_edit(adamw__t=5), r"adamw\.t \(5\) differs from step \(1\)"),
    ("adamw-betas-strings", meta_edit(adamw__betas=["0.9", "0.999"]), r"adamw\.betas must be two numbers"),
    ("adamw-betas-one", meta_edit(adamw__betas=[0.9]), r"adamw\.betas"),
    ("adamw-lr-negative", meta_edit(adamw__lr=-1e-3), r"adamw\.lr must be a finite number greater than 0"),
    ("adamw-eps-string", meta_edit(adamw__eps="1e-8"), r"adamw\.eps"),
    ("adamw-list", meta_edit(adamw=[1, 2]), r"adamw is list"),
    ("run-seed-negative", meta_edit(run__seed=-1, h_params__seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
    ("run-batch-size-disagrees", meta_edit(run__batch_size=10**12),
     r"run\.batch_size = 1000000000000 but h_params\.batch_size = 2"),
    ("run-d-model-disagrees", meta_edit(run__d_model=32), r"run\.d_model = 32 but h_params\.d_model = 16"),
    ("run-dtype-disagrees", meta_edit(run__dtype="float64"), r"run\.dtype = 'float64' but its weights are float32"),
    ("run-compact-vocab-disagrees", meta_edit(run__compact_vocab=False), r"run\.compact_vocab = False but has"),
    ("run-lr-schedule-unknown", meta_edit(run__lr_schedule="linear"), r"malformed run\.lr_schedule"),
    ("run-data-not-a-path", meta_edit(run__data=7), r"malformed run\.data"),
    ("run-keep-unknown", meta_edit(run__keep="worst"), r"malformed run\.keep \('worst'\): it must be last or best"),
    ("run-time-negative", meta_edit(run__time_s=-1.0), r"malformed run\.time_s \(-1\.0\): it must be a finite number"),
    ("run-time-string", meta_edit(run__time_s="12"), r"malformed run\.time_s"),
    ("run-best-loss-nan", meta_edit(run__best_valid_loss=float("nan")), r"malformed run\.best_valid_loss \(nan\)"),
    ("run-list", meta_edit(run=[1]), r"malformed run entry \(list\)"),
    ("moment-0-d", tensor_edit("adamw.exp_avg.transformer_blocks.0.ln1.bias", np.zeros((), np.float32)),
     r"adamw\.exp_avg\.transformer_blocks\.0\.ln1\.bias has shape \(\) but the model needs \(16,\)"),
    ("moment-transposed", tensor_edit("adamw.exp_avg_sq.transformer_blocks.0.ffn.ffn.0.weight",
                                      lambda v: np.ascontiguousarray(v.T)),
     r"has shape \(16, 64\) but the model needs \(64, 16\)"),
    ("moment-missing", tensor_edit("adamw.exp_avg_sq.transformer_blocks.0.ln2.weight", None),
     r"lacks AdamW's second moment of transformer_blocks\.0\.ln2\.weight"),
    ("moment-negative-v", tensor_edit("adamw.exp_avg_sq.transformer_blocks.0.ln2.weight", lambda v: v - 1),
     r"holds negative values"),
    ("param-nan", tensor_edit(BIAS, lambda p: np.full_like(p, np.nan)), r"holds NaN or infinite values"),
    ("param-float64", tensor_edit(BIAS, lambda p: p.astype(np.float64)), r"is float64 but .*dtype is float32"),
    ("param-int", tensor_edit(BIAS, lambda p: p.astype(np.int32)), r"is int32 but"),
    ("tensor-unexpected", tensor_edit("extra", np.zeros(3, np.float32)), r"unexpected tensor 'extra'"),
    ("mask-not-causal", tensor_edit("transformer_blocks.0.mha.heads.1.mask", lambda m: np.ones_like(m)),
     r"heads\.1\.mask is not the causal mask"),
    ("tokenizer-other", meta_edit(tokenizer="gpt2"), r"made for the tokenizer 'gpt2'; this code has only cl100k_base"),
    ("vocab-0-d", meta_edit(vocab=5), r"vocab must be a list of token ids, got 5"),
    ("vocab-2-d", vocab_edit(lambda v: [v[:30], v[30:]]), r"vocab must be a list of token ids, got \[\["),
    ("vocab-float", vocab_edit(lambda v: [float(i) for i in v]), r"vocab must be a list of token ids, got \[3\.0"),
    ("vocab-bool", vocab_edit(lambda v: [True] + v[1:]), r"vocab must be a list of token ids, got \[True"),
    ("vocab-empty", meta_edit(vocab=[]), r"holds 0 ids but the model has 60"),
    ("vocab-short", vocab_edit(lambda v: v[:-1]), r"holds 59 ids"),
    ("vocab-outside-tokenizer", vocab_edit(lambda v: [i + 100000 for i in v]), r"distinct ids of text tokens, in \[0, 100256\)"),
    ("vocab-special-id", vocab_edit(lambda v: v[:-1] + [100256]),  # issue 23.9: a KeyError in decode
     r"vocab must hold distinct ids of text tokens, in \[0, 100256\), in increasing order"),
    ("vocab-negative", vocab_edit(lambda v: [i - 10 for i in v]), r"distinct ids"),
    ("vocab-unsorted", vocab_edit(lambda v: v[::-1]), r"increasing order"),
]
HANGS = ("num-blocks-10**7", "context-length-10**8")  # these used to hang or exhaust memory


@pytest.mark.parametrize("name, edit, message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_checkpoint_is_refused(good, tmp_path, name, edit, message):
    path = craft(good, tmp_path / "crafted.ckpt", edit)
    with pytest.raises(CheckpointError) as info:
        load_state(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert re.search(message, text), text


def test_the_good_checkpoint_and_a_weights_only_one_load(good, tmp_path):
    """The crafted rows fail because of their one change only."""
    tensors, meta = load_state(good)
    model = build_model(tensors, meta)
    restore_optimizer(AdamW(model.params), tensors, meta, good)
    bare = craft(good, tmp_path / "bare.ckpt", lambda tensors, meta: (
        [tensors.pop(n) for n in list(tensors) if n.startswith("adamw.")], meta.update(adamw=None)))
    assert load_state(bare)[1]["adamw"] is None


def test_parameter_counts_match_parameter_shapes():
    """The arithmetic the budget uses before any list is built equals the list's."""
    for h in (H, {**H, "num_blocks": 3, "num_heads": 4, "d_model": 32}, {**H, "max_token_value": 1}):
        shapes = parameter_shapes(h)
        assert validate.parameter_tensor_count(h) == len(shapes)
        assert validate.parameter_count(h) == sum(math.prod(s) for s in shapes.values())


def test_model_bytes_bounds_what_building_a_model_allocates():
    """The estimate is an upper bound of the real peak (tracemalloc sees NumPy's allocations)."""
    Model(H)  # the first model fills module caches once per process; they are not the model's
    for h, dtype in ((H, "float32"), ({**H, "context_length": 4096, "d_model": 64, "num_heads": 4}, "float64")):
        tracemalloc.start()
        Model(h, dtype=dtype)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= validate.model_bytes(h, np.dtype(dtype).itemsize)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("dtype, accum", [("float32", 1), ("float64", 2)])
def test_training_and_generation_bytes_bound_what_they_allocate(dtype, accum, fast):
    """A training step (forward, backward, AdamW, on train.py's fast model or its --reference
    one) and a generation stay under their estimates: settings that fit are never refused."""
    from nanograd.fast import FastAdamW
    from transformer.fast_model import FastModel
    model_class, adamw_class = (FastModel, FastAdamW) if fast else (Model, AdamW)
    h = {**H, "d_model": 32, "num_heads": 4, "context_length": 32, "max_token_value": 500}
    B, itemsize = 4, np.dtype(dtype).itemsize
    x = np.random.default_rng(0).integers(0, 500, (B, 32))  # (B, T)
    model_class(h)(x, x)  # the first forward fills module caches once per process
    tracemalloc.start()
    model = model_class(h, dtype=dtype)
    optimizer = adamw_class(model.params)
    for _ in range(accum):
        model(x, x)
        grads = {name: g.copy() for name, g in model.backward().items()}
    optimizer.step(grads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del model, optimizer, grads
    tracemalloc.start()
    Model(h, dtype=dtype).eval().generate(x[:1, :5], 40, rng=np.random.default_rng(0))
    generation_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= validate.training_bytes(h, itemsize, B, accum)
    assert generation_peak <= validate.model_bytes(h, itemsize) + validate.generation_bytes(h, itemsize, 5, 40)


def test_check_memory_names_the_estimate_and_the_budget(monkeypatch):
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, "1000000")
    validate.check_memory(10**6, "x needs", "do less")
    with pytest.raises(UserError, match=r"^x needs about 1\.0 MB of memory but this machine has 1\.0 MB "
                                        r"available; do less$"):
        validate.check_memory(10**6 + 1, "x needs", "do less")
    monkeypatch.delenv(validate.MEMORY_LIMIT_ENV)
    assert validate.memory_budget() > 10**6  # the machine's own figure


class FakeDevice:
    """The parts of CuPy that the GPU memory check reads: the device's free memory and the pool's."""

    def __init__(self, free, pooled=0):
        self.cuda = SimpleNamespace(runtime=SimpleNamespace(memGetInfo=lambda: (free, 141 * 10**9),
                                                            getDeviceProperties=lambda i: {"name": b"Fake GPU"},
                                                            runtimeGetVersion=lambda: 13000),
                                    Device=lambda: SimpleNamespace(id=0))
        self.get_default_memory_pool = lambda: SimpleNamespace(free_bytes=lambda: pooled)
        self.__version__ = "14.2.0"


def test_on_cupy_training_is_checked_against_the_gpus_free_memory(monkeypatch):
    """A batch that cannot fit on the GPU used to end in CuPy's OutOfMemoryError traceback."""
    from nanograd import backend
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, str(10**12))
    h = {**H, "max_token_value": 100_218}
    need = validate.training_bytes(h, 4, 64)
    monkeypatch.setattr(backend, "cupy", FakeDevice(free=need - 1000, pooled=999))
    with pytest.raises(UserError, match=r"^training with d_model 16, .*batch_size 64 .* needs about \d+\.\d [MG]B of "
                                        r"GPU memory but the GPU has \d+\.\d [MG]B free; lower --batch-size"):
        validate.check_training_memory(h, "float32", 64, backend="cupy")
    validate.check_training_memory(h, "float32", 64)  # NumPy: the host's budget alone
    monkeypatch.setattr(backend, "cupy", FakeDevice(free=need - 1000, pooled=1000))  # the pool's spare blocks count
    validate.check_training_memory(h, "float32", 64, backend="cupy")
    # the host only builds the model on CuPy: a host budget below the run's but above the model's passes
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, str(validate.model_bytes(h, 4)))
    monkeypatch.setattr(backend, "cupy", FakeDevice(free=10**12))
    validate.check_training_memory(h, "float32", 64, backend="cupy")
    with pytest.raises(UserError, match="of memory but this machine has"):
        validate.check_training_memory(h, "float32", 64)
    with pytest.raises(UserError, match=r"^generating 500 tokens .* of GPU memory but the GPU has 1\.0 kB free"):
        monkeypatch.setattr(backend, "cupy", FakeDevice(free=1000))
        validate.check_generation_memory(h, "float32", 10, 500, backend="cupy")


def test_train_py_refuses_a_batch_the_gpu_cannot_hold_before_allocating(monkeypatch, capsys):
    import train
    from nanograd import backend
    monkeypatch.setattr(backend, "cupy", FakeDevice(free=10**9))  # nothing else of CuPy exists: no allocation can run
    monkeypatch.setattr(backend, "cupy_unavailable_reason", lambda: None)
    assert train.main(["--backend", "cupy", "--batch-size", "4096", "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.match(r"^error: training with .*batch_size 4096 .* of GPU memory but the GPU has 1\.0 GB free; ", err)


def test_the_training_estimate_says_what_it_knows_of_the_vocabulary(monkeypatch):
    """Issue 22: the bound made before the data is read said "a vocabulary of 1" (a placeholder);
    it is a lower bound for any vocabulary, and says so; after the data, the vocabulary is named."""
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, "1000000")
    h = dict(d_model=80, num_blocks=6, num_heads=4, context_length=128, max_token_value=None)
    with pytest.raises(UserError, match=r"^training with d_model 80, num_blocks 6, context_length 128, "
                                        r"batch_size 2 and any vocabulary needs at least about [\d.]+ MB of "
                                        r"memory but this machine has 1\.0 MB available; lower --batch-size"):
        validate.check_training_memory(h, "float32", 2)
    at_least = validate.training_bytes({**h, "max_token_value": 1}, 4, 2)
    assert at_least < validate.training_bytes({**h, "max_token_value": 2}, 4, 2)  # a lower bound: one token
    with pytest.raises(UserError, match=r" batch_size 2 and a vocabulary of 100,218 needs about [\d.]+ MB "):
        validate.check_training_memory({**h, "max_token_value": 100218}, "float32", 2)


# ---- special files --------------------------------------------------------------------------

@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "fifo"])
def test_read_file_refuses_what_is_not_a_regular_file(device, fifo):
    path = fifo if device == "fifo" else device
    kind = "a FIFO" if device == "fifo" else "a character device"
    with pytest.raises(UserError, match=rf"^text file {path} is {kind}.*, not a regular file; pass"):
        validate.read_file(path, "text file")


def test_read_file_checks_the_size_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 1000)
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, "1999")
    with pytest.raises(UserError, match=r"reading text file .* \(1\.0 kB\) needs about 2\.0 kB of memory"):
        validate.read_file(path, "text file", per_byte=2)
    assert validate.read_file(path, "text file", per_byte=1) == b"x" * 1000


def run(*args, timeout=60):
    """python args..., from the repository root with the pinned budget; killed after timeout."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line(result, pattern):
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert result.returncode == 2, out
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text("the module returns a list of values from the file path " * 40)
    return path


ENTRY_POINTS = {  # how each reads a checkpoint
    "inference": lambda ckpt, tmp: ["inference.py", "--ckpt", ckpt, "--max-new-tokens", "1"],
    "resume": lambda ckpt, tmp: ["train.py", "--resume", ckpt, "--out", tmp / "out.ckpt"],
    "convert": lambda ckpt, tmp: ["-m", "transformer.convert", ckpt, tmp / "book.ckpt"],
    "inspect": lambda ckpt, tmp: ["-m", "transformer.inspect", "--ckpt", ckpt, "--out-dir", tmp / "maps"],
}


ENTRY_CASES = [(entry, name) for name in HANGS for entry in ENTRY_POINTS] + [
    ("inference", "shape-70-dims"), ("resume", "dropout-string"), ("resume", "run-seed-negative"),
    ("inference", "vocab-outside-tokenizer")] + [(entry, "vocab-special-id") for entry in ENTRY_POINTS]


@pytest.mark.parametrize("entry, name", ENTRY_CASES, ids=[f"{e}-{n}" for e, n in ENTRY_CASES])
def test_crafted_checkpoints_through_every_entry_point(good, tmp_path, entry, name):
    """One line and exit 2 within the timeout (num_blocks 10**7 used to run for minutes into 9.7 GB)."""
    edit, message = next((c[1], c[2]) for c in CRAFTED if c[0] == name)
    path = craft(good, tmp_path / "crafted.ckpt", edit)
    assert_one_line(run(*ENTRY_POINTS[entry](path, tmp_path)), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.ckpt"]  # nothing written


SPECIAL_CASES = [(what, "fifo") for what in ("inference-ckpt", "resume", "data", "plot")] + [
    ("inference-ckpt", "/dev/zero"), ("data", "/dev/zero"), ("plot", "/dev/urandom")]


@pytest.mark.parametrize("what, special", SPECIAL_CASES, ids=[f"{w}-{s.split('/')[-1]}" for w, s in SPECIAL_CASES])
def test_special_files_are_refused(fifo, data, tmp_path, what, special):
    """A FIFO used to block forever, /dev/zero to read until memory ran out."""
    path = fifo if special == "fifo" else special
    args = {"inference-ckpt": ["inference.py", "--ckpt", path],
            "resume": ["train.py", "--resume", path, "--out", tmp_path / "out.ckpt"],
            "data": ["train.py", "--data", path, "--out", tmp_path / "out.ckpt"],
            "plot": ["-m", "transformer.plot", path, "--out", tmp_path / "loss.png"]}[what]
    kind = "a FIFO" if special == "fifo" else "a character device"
    assert_one_line(run(*args, timeout=30), rf"{re.escape(str(path))} is {kind}.*not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


# ---- sizes from flags -----------------------------------------------------------------------

S = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "16",
     "--batch-size", "2", "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2"]


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", r"--seed must be an integer in \[0, 2\*\*64\), got -1\."),
    ("--seed", str(2**64), r"--seed must be an integer in \[0, 2\*\*64\)"),
    ("--d-model", "100000000", r"training with d_model 100000000, .* and any vocabulary needs at least about "
                               r"[\d.]+ EB of memory but this machine has 2\.0 GB available; lower --batch-size"),
    ("--batch-size", "1000000000", r"batch_size 1000000000 and any vocabulary needs at least about [\d.]+ TB "),
    ("--num-blocks", "10000000", r"num_blocks 10000000, .* any vocabulary needs at least about [\d.]+ TB "),
    ("--grad-clip", "inf", r"--grad-clip must be a finite number, got inf\."),
], ids=["seed-negative", "seed-too-big", "d-model-1e8", "batch-size-1e9", "num-blocks-1e7", "grad-clip-inf"])
def test_train_refuses_settings_beyond_the_machine(data, tmp_path, flag, value, message):
    before = data.read_bytes()
    i = S.index(flag) if flag in S else len(S)
    settings_ = S[:i] + [flag, value] + S[i + 2:]
    assert_one_line(run("train.py", *settings_, "--data", data, "--out", tmp_path / "m.ckpt"), message)
    assert list(tmp_path.iterdir()) == [] and data.read_bytes() == before


def test_resume_refuses_a_run_beyond_the_machine(good, tmp_path):
    """batch_size 10**12 in both run and h_params is consistent, but no machine can train it:
    refused with the estimate before the data is even read."""
    path = craft(good, tmp_path / "big.ckpt", meta_edit(run__batch_size=10**12, h_params__batch_size=10**12))
    load_state(path)  # a valid checkpoint: inference can use it
    assert_one_line(run("train.py", "--resume", path, "--out", tmp_path / "out.ckpt"),
                    r"batch_size 1000000000000 .* needs about [\d.]+ PB of memory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.ckpt"]


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", r"--seed must be an integer in \[0, 2\*\*64\), got -1\."),
    ("--max-new-tokens", str(10**12), r"generating 1000000000000 tokens .* needs about [\d.]+ TB of memory"),
], ids=["seed-negative", "max-new-tokens-1e12"])
def test_inference_refuses_flags_beyond_the_machine(good, flag, value, message):
    assert_one_line(run("inference.py", "--ckpt", good, "--prompt", "$", flag, value), message)


# ---- fuzz -----------------------------------------------------------------------------------

FUZZ_BUDGET = 64 * 10**6  # bytes: a small budget, so that a wrong estimate would show
FIELDS = ["format", "dtype", "step", "tokenizer", "vocab", *[f"h_params.{k}" for k in H], *[f"run.{k}" for k in RUN],
          *[f"adamw.{k}" for k in ("lr", "betas", "eps", "weight_decay", "t")], "adamw", "run", "h_params"]
NASTY = st.sampled_from([None, "", "x", "0.1", math.nan, math.inf, -math.inf, -1, 0, 1.5, True, 10**7,
                         10**12, 2**64, [], [0.9, "0.999"], {}, "float16"])
VALUES = st.one_of(
    NASTY, st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([2**31, 2**63, 2**70, 10**7, 10**12, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["float32", "float64", "float16", "int64", "constant", "cosine", "nanograd-transformer"]),
    st.lists(st.integers(-2, 2**40), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ENTRY_FIELDS = st.sampled_from(["dtype", "shape", "data_offsets"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.one_of(st.tuples(st.just("meta"), st.sampled_from(FIELDS), VALUES),
                                  st.tuples(st.just("entry"), ENTRY_FIELDS, VALUES)), min_size=1, max_size=3),
       which=st.integers(0, 10**6))
def test_fuzz_checkpoint_fields(good, tmp_path, monkeypatch, changes, which):
    """Whatever fields change (checksum recomputed): the model loads, runs a step of inference and
    restores its optimizer, or a one-line CheckpointError says why not; and the peak memory of
    all that stays within the budget the estimates were checked against."""
    monkeypatch.setenv(validate.MEMORY_LIMIT_ENV, str(FUZZ_BUDGET))

    def edit(header):
        names = sorted(header["tensors"])
        for where, field, value in changes:
            if where == "entry":
                header["tensors"][names[which % len(names)]][field] = value
            else:
                try:
                    set_field(header, field, value)
                except (KeyError, TypeError):  # a parent already replaced by a non-dict
                    pass
    path = tmp_path / "fuzz.ckpt"
    rewrite_header(good, path, edit)
    tracemalloc.start()
    try:
        tensors, meta = load_state(path)
        model = build_model(tensors, meta)
        ids = encode_prompt("$", get_tokenizer(), tensors.get("vocab"), meta["h_params"]["max_token_value"])
        out = model.eval().generate(ids[None], 1, rng=np.random.default_rng(0))[0]  # (2,) one new token
        decode(get_tokenizer(), out if "vocab" not in tensors else tensors["vocab"][out])
        if meta["adamw"] is not None:
            restore_optimizer(AdamW(model.params), tensors, meta, path)
    except UserError as e:  # a CheckpointError, or any other of the project's one-line errors
        assert "\n" not in str(e) and str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= FUZZ_BUDGET
