"""End-to-end tests of train.py and inference.py on a small generated English-like text,
as subprocesses (the way a user runs them) and in-process through train.main where faster."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors.numpy

from transformer.data import split, tokenize
from transformer.model import Model, parameter_shapes
from transformer.checkpoint import save_checkpoint
from transformer.state import build_model, load_state
from transformer.tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # train.py is a script at the repository root, not part of the installed packages
    sys.path.insert(0, REPO)
import train  # noqa: E402
from transformer.evaluation import full_loss  # noqa: E402
TINY = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "16",
        "--batch-size", "4", "--max-iters", "30", "--eval-interval", "10", "--eval-iters", "2",
        "--learning-rate", "3e-3", "--no-progress"]
STEP_LINE = re.compile(r"^Step: (\d+), Training Loss: (\d+\.\d{3}), Validation Loss: (\d+\.\d{3})"
                       r"(?:, Full Validation Loss: (\d+\.\d{3}))?$")
SEPARATOR = "---------------"
# float64 losses computed two ways (one windowed pass, or one forward per token) differ only in
# summation order: rtol 1e-12.  The logged full loss passed through a JSON float (exact) after
# being averaged over ~600 tokens in another order: 1e-10.  AdamW's first moment after one step,
# m = 0.1 * g, rounds once more than our gradient: rtol 1e-9, atol 1e-12 of the tensor's scale
# for entries that are cancelling sums.  A real bug is off by O(1) in each case.
LOSS_RTOL, LOGGED_RTOL = 1e-12, 1e-10
MOMENT_RTOL, MOMENT_ATOL_SCALE = 1e-9, 1e-12


def english_like(n_sentences=600, seed=0):
    """~5000 words of simple sentences; every word is one cl100k token with an id below 1000,
    so the (non-compact) vocabulary stays ~1000 and the runs stay fast."""
    rng = np.random.default_rng(seed)
    det = ["the", "his", "their", "your", "one", "any", "this", "that"]
    noun = ["man", "time", "name", "work", "data", "value", "part", "type", "class", "string"]
    verb = ["will get", "can set", "has", "was", "will add", "can return", "will work"]
    prep = ["for", "with", "from", "over", "about", "and"]
    sentences = []
    for i in range(n_sentences):
        words = ["The", rng.choice(noun), rng.choice(verb), rng.choice(det), rng.choice(noun),
                 rng.choice(prep), rng.choice(det), rng.choice(noun)]
        sentences.append(" ".join(words) + (".\n" if i % 5 == 4 else ". "))
    return "".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(english_like(), encoding="utf-8")
    return path


def run_script(script, *args, cwd):
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                            cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def step_lines(stdout):
    """(step, train loss, valid loss, full valid loss or None) of every line in the book's format."""
    out = []
    for line in stdout.splitlines():
        m = STEP_LINE.match(line)
        if m:
            out.append((int(m[1]), float(m[2]), float(m[3]), m[4] and float(m[4])))
    return out


def corpus_ids(corpus):
    return tokenize(corpus.read_text(encoding="utf-8"), get_tokenizer())


# ---- one subprocess run, shared by the tests that read its outputs ----------------------------

@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """train.py run from a fresh directory; its stdout and checkpoint path."""
    cwd = tmp_path_factory.mktemp("run")
    stdout = run_script("train.py", "--data", corpus, "--out", "ckpt/model.ckpt", *TINY, cwd=cwd)
    return stdout, cwd / "ckpt" / "model.ckpt"


def test_prints_the_books_lines_and_loss_falls(trained, corpus):
    stdout, _ = trained
    lines = step_lines(stdout)
    assert [s for s, *_ in lines] == [0, 10, 20, 29], stdout
    V = int(corpus_ids(corpus).max()) + 1
    first, last = lines[0], lines[-1]
    assert abs(first[1] - math.log(V)) < 0.5 and abs(first[2] - math.log(V)) < 0.5, (first, V)
    assert last[1] < first[1] - 1.0 and last[2] < first[2] - 1.0, lines
    assert stdout.splitlines()[0].startswith("Backend: numpy")  # says where it runs, first
    assert f"vocabulary {V:,}" in stdout


def test_checkpoint_loads_with_the_right_h_params(trained, corpus):
    _, ckpt = trained
    tensors, meta = load_state(ckpt)
    expected = dict(d_model=16, num_blocks=1, num_heads=2, context_length=16, batch_size=4,
                    max_iters=30, learning_rate=3e-3, dropout=0.1, eval_interval=10, eval_iters=2,
                    seed=1337, max_token_value=int(corpus_ids(corpus).max()) + 1)
    assert meta["h_params"] == expected
    assert meta["step"] == 30 and meta["dtype"] == "float32"
    model = build_model(tensors, meta)
    assert list(model.params) == list(parameter_shapes(expected))
    assert "vocab" not in tensors
    stored = safetensors.numpy.load_file(ckpt)  # any safetensors reader: the book's names, AdamW's moments
    assert all(np.array_equal(stored[name], tensors[name]) for name in model.params)
    assert "adamw.exp_avg_sq.model_out_linear_layer.weight" in stored
    # the trained weights are not the initial ones, and the model still runs
    fresh = Model(expected, seed=1337)
    assert all(not np.array_equal(model.params[n], fresh.params[n]) for n in model.params)
    logits, loss = model.eval()(np.zeros((1, 16), dtype=np.int64), np.zeros((1, 16), dtype=np.int64))
    assert np.isfinite(logits).all() and np.isfinite(loss)


def test_metrics_jsonl_has_one_record_per_evaluation(trained):
    stdout, ckpt = trained
    records = [json.loads(line) for line in open(ckpt.with_name("model.metrics.jsonl"), encoding="utf-8")]
    assert [r["step"] for r in records] == [0, 10, 20, 29]
    for record, (step, train_loss, valid_loss, _) in zip(records, step_lines(stdout)):
        assert record["step"] == step
        assert round(record["train_loss"], 3) == pytest.approx(train_loss, abs=1e-9)
        assert round(record["valid_loss"], 3) == pytest.approx(valid_loss, abs=1e-9)
        assert record["lr"] == 3e-3


def parse_inference(stdout):
    """The text between the two separator lines, the parameter count and (name, shape) lines."""
    lines = stdout.splitlines()
    marks = [i for i, line in enumerate(lines) if line == SEPARATOR]
    assert len(marks) == 2, stdout
    text = "\n".join(lines[marks[0] + 1:marks[1]])
    count = re.search(r"^Model parameters: ([\d,]+)$", stdout, re.M)
    assert count, stdout
    shapes = re.findall(r"^  (\S+): \(([\d, ]*)\)$", stdout, re.M)
    return text, int(count[1].replace(",", "")), [(n, tuple(int(d) for d in s.split(",") if d.strip()))
                                                  for n, s in shapes]


def test_inference_prints_text_and_every_parameter(trained):
    _, ckpt = trained
    stdout = run_script("inference.py", "--ckpt", ckpt, "--prompt", "The man", "--max-new-tokens", 20,
                        "--list-params", cwd=ckpt.parent)
    text, count, shapes = parse_inference(stdout)
    assert text.startswith("The man") and len(text) > len("The man")
    tensors, meta = load_state(ckpt)
    expected = [(name, tuple(shape)) for name, shape in parameter_shapes(meta["h_params"]).items()]
    assert shapes == expected
    assert count == sum(tensors[name].size for name, _ in expected)


# ---- --compact-vocab: a dense vocabulary, mapped back by inference ----------------------------

def test_compact_vocab_round_trip(corpus, tmp_path):
    stdout = run_script("train.py", "--data", corpus, "--out", "c.ckpt", "--compact-vocab", *TINY,
                        "--max-iters", 20, cwd=tmp_path)
    ids = corpus_ids(corpus)
    vocab = np.unique(ids)
    assert [s for s, *_ in step_lines(stdout)] == [0, 10, 19]
    tensors, meta = load_state(tmp_path / "c.ckpt")
    np.testing.assert_array_equal(tensors["vocab"], vocab)
    assert meta["h_params"]["max_token_value"] == len(vocab) < 50
    assert tensors["model_out_linear_layer.weight"].shape == (len(vocab), 16)

    prompt, new, seed = "The class will", 30, 5
    out = run_script("inference.py", "--ckpt", "c.ckpt", "--prompt", prompt, "--max-new-tokens", new,
                     "--seed", seed, "--temperature", 1.0, cwd=tmp_path)
    text, count, _ = parse_inference(out)
    # The same generation done here by hand: the prompt's cl100k ids renumbered into the dense
    # vocabulary, sampled, then mapped back to cl100k ids before decoding.
    tokenizer = get_tokenizer()
    dense = np.searchsorted(vocab, tokenizer.encode_ordinary(prompt))
    assert (vocab[dense] == tokenizer.encode_ordinary(prompt)).all()
    model = build_model(tensors, meta).eval()
    generated = model.generate(dense[None], new, temperature=1.0, rng=np.random.default_rng(seed))[0]
    assert text == tokenizer.decode(vocab[generated].tolist())
    assert text.startswith(prompt)
    # Unmapped dense ids 0..V-1 would decode to cl100k's punctuation and digits: the text holds only
    # the corpus's characters.
    assert set(text) <= set(corpus.read_text(encoding="utf-8")), text
    assert count == model.num_params()


# ---- in-process runs: float64, --eval-full, resuming, gradient accumulation --------------------

def run_main(argv, capsys):
    assert train.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def per_token_mean_loss(model, data, context_length):
    """The mean loss of every next-token prediction in data, each computed on its own: the target
    data[j+1] is predicted from data[s..j], s = j rounded down to a multiple of context_length
    (the windows full_loss cuts), by a separate forward whose last position is j."""
    losses = []
    for j in range(len(data) - 1):
        s = (j // context_length) * context_length
        logits = model(data[s:j + 1][None])[0][0, -1].astype(np.float64)  # (V,)
        shifted = logits - logits.max()
        losses.append(math.log(np.exp(shifted).sum()) - shifted[data[j + 1]])
    return float(np.mean(losses))


@pytest.mark.parametrize("length", [9, 17, 8 * 3 + 1, 8 * 4 + 1 + 5])
def test_full_loss_is_the_mean_over_every_token(length):
    h = dict(d_model=8, num_blocks=1, num_heads=2, context_length=8, dropout=0.0, max_token_value=13)
    model = Model(h, dtype="float64", seed=1).eval()
    data = np.random.default_rng(length).integers(0, 13, size=length)  # (N,)
    full = full_loss(model, data, 8, batch_size=4)
    assert full == pytest.approx(per_token_mean_loss(model, data, 8), rel=LOSS_RTOL)
    if length <= 9:  # one window: one long pass
        assert full == pytest.approx(model(data[:-1][None], data[1:][None])[1], rel=LOSS_RTOL)


def test_float64_eval_full_and_resume(corpus, tmp_path, capsys):
    """--dtype float64 trains; resuming it with --eval-full evaluates exactly the saved model:
    the logged full validation loss equals the per-token mean over the validation split."""
    first = tmp_path / "first.ckpt"
    common = ["--data", corpus, *TINY, "--dtype", "float64"]
    out = run_main([*common, "--out", first, "--max-iters", 10], capsys)
    assert [s for s, *_ in step_lines(out)] == [0, 9]
    assert "float64" in out
    tensors, meta = load_state(first)
    assert meta["dtype"] == "float64" and meta["step"] == 10
    assert tensors["model_out_linear_layer.weight"].dtype == np.float64

    resumed = tmp_path / "resumed.ckpt"
    shutil.copy(first, resumed)
    out = run_main(["--resume", resumed, "--max-iters", 11, "--eval-full", "--no-progress"], capsys)
    lines = step_lines(out)
    assert [s for s, *_ in lines] == [10]
    full_printed = lines[0][3]
    record = [json.loads(line) for line in open(tmp_path / "resumed.metrics.jsonl", encoding="utf-8")][-1]
    assert record["step"] == 10 and round(record["valid_full_loss"], 3) == pytest.approx(full_printed)

    model = build_model(tensors, meta).eval()  # the model the step-10 evaluation saw
    val = split(corpus_ids(corpus))[1]
    expected = per_token_mean_loss(model, val, 16)
    assert record["valid_full_loss"] == pytest.approx(expected, rel=LOGGED_RTOL)
    assert load_state(resumed)[1]["step"] == 11


def test_grad_accumulation_averages_the_micro_batches(corpus, tmp_path, capsys):
    """One step of --grad-accum-steps 2 --batch-size 2: AdamW's first moment after step 1 is
    (1 - beta1) * g, so the checkpoint shows the gradient train.py used; it must be the mean of the
    two micro-batches' gradients (drawn as train.py documents: rng (seed, 0, step, micro))."""
    ckpt = tmp_path / "acc.ckpt"
    out = run_main(["--data", corpus, *TINY, "--batch-size", 2, "--grad-accum-steps", 2, "--dropout", 0,
                    "--dtype", "float64", "--max-iters", 1, "--out", ckpt], capsys)
    assert [s for s, *_ in step_lines(out)] == [0]
    tensors, meta = load_state(ckpt)
    assert meta["run"]["grad_accum_steps"] == 2
    model = Model(meta["h_params"], dtype="float64", seed=1337)  # the run's initial weights
    train_data = split(corpus_ids(corpus))[0]
    grads = []
    for micro in range(2):
        x, y = train.get_batch(train_data, 2, 16, np.random.default_rng([1337, 0, 0, micro]))
        model(x, y)
        grads.append({name: g.copy() for name, g in model.backward().items()})  # backward reuses arrays
    for name in model.params:
        mean = (grads[0][name] + grads[1][name]) / 2
        np.testing.assert_allclose(tensors[f"adamw.exp_avg.{name}"], 0.1 * mean, rtol=MOMENT_RTOL,
                                   atol=MOMENT_ATOL_SCALE * np.abs(mean).max(), err_msg=name)


def test_grad_clip_scales_every_gradient_before_adamw_sees_it(corpus, tmp_path, capsys):
    """One step of --grad-clip 0.01: AdamW's first moment is 0.1 * g * 0.01 / |g| for every
    parameter, the output layer's too (it must not start updating before the clip)."""
    ckpt = tmp_path / "clip.ckpt"
    run_main(["--data", corpus, *TINY, "--dropout", 0, "--dtype", "float64", "--max-iters", 1,
              "--grad-clip", 0.01, "--out", ckpt], capsys)
    tensors, meta = load_state(ckpt)
    model = Model(meta["h_params"], dtype="float64", seed=1337)  # the run's initial weights
    x, y = train.get_batch(split(corpus_ids(corpus))[0], 4, 16, np.random.default_rng([1337, 0, 0, 0]))
    model(x, y)
    grads = model.backward()
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    assert norm > 0.01  # so the clip did scale
    for name, g in grads.items():
        np.testing.assert_allclose(tensors[f"adamw.exp_avg.{name}"], 0.1 * g * (0.01 / (norm + 1e-6)), rtol=MOMENT_RTOL,
                                   atol=MOMENT_ATOL_SCALE * np.abs(g).max(), err_msg=name)


@pytest.mark.parametrize("flags, early", [([], True), (["--grad-clip", "1.0"], False),
                                          (["--grad-accum-steps", "2"], False)])
def test_adamw_starts_early_only_when_it_need_not_see_every_gradient(corpus, tmp_path, capsys, monkeypatch,
                                                                     flags, early):
    """By default AdamW begins on the output layer inside backward(), once a step; a clip or a
    sum over micro-batches needs every gradient first, so then it never starts early."""
    starts = []

    class RecordingAdamW(train.FastAdamW):
        def start(self, grads):
            starts.append(sorted(grads))
            super().start(grads)
    monkeypatch.setattr(train, "FastAdamW", RecordingAdamW)
    run_main(["--data", corpus, *TINY, "--max-iters", 3, "--out", tmp_path / "m.ckpt", *flags], capsys)
    head = ["model_out_linear_layer.bias", "model_out_linear_layer.weight"]
    assert starts == ([head] * 3 if early else [])


def metrics_losses(path):
    return [(r["step"], r["train_loss"], r["valid_loss"]) for r in map(json.loads, open(path, encoding="utf-8"))]


@pytest.mark.parametrize("flags", [[], ["--grad-accum-steps", "2", "--grad-clip", "0.5"]], ids=["plain", "accum-clip"])
def test_reference_and_fast_paths_train_the_same(corpus, tmp_path, capsys, monkeypatch, flags):
    """--reference (Model, AdamW) and the default (FastModel, FastAdamW): float32, dropout on,
    20 steps with an evaluation after every one; the losses and the final weights and moments agree
    to float32 rounding.  Each step's rounding differs (the output layer's sums run in another
    order) and training carries it on: measured 7e-8 relative in the losses, 2e-5 of a tensor's
    largest entry in the weights and moments after 20 steps; a wrong gradient is off by far more."""
    runs = {}
    for path in ("reference", "fast"):
        args = ["--data", corpus, *TINY, "--max-iters", 20, "--eval-interval", 1, "--out", tmp_path / f"{path}.ckpt",
                *flags, *(["--reference"] if path == "reference" else [])]
        run_main(args, capsys)
        runs[path] = metrics_losses(tmp_path / f"{path}.metrics.jsonl"), load_state(tmp_path / f"{path}.ckpt")[0]
    (ref_losses, ref_tensors), (fast_losses, fast_tensors) = runs["reference"], runs["fast"]
    assert [r[0] for r in ref_losses] == [r[0] for r in fast_losses] == list(range(20))
    np.testing.assert_allclose(np.array(fast_losses), np.array(ref_losses), rtol=1e-6)
    assert ref_losses[-1][1] < ref_losses[0][1]  # it trained
    for name, value in ref_tensors.items():
        np.testing.assert_allclose(fast_tensors[name], value, rtol=1e-4, atol=1e-4 * np.abs(value).max(),
                                   err_msg=name)


def test_reference_flag_trains_with_the_plain_model_and_adamw(corpus, tmp_path, capsys, monkeypatch):
    made = []
    real = train.make_model_and_optimizer

    def recording(*args):
        model, optimizer = real(*args)
        made.append((type(model).__name__, type(optimizer).__name__))
        return model, optimizer
    monkeypatch.setattr(train, "make_model_and_optimizer", recording)
    for flag in ([], ["--reference"]):
        run_main(["--data", corpus, *TINY, "--max-iters", 1, "--out", tmp_path / f"m{len(flag)}.ckpt", *flag], capsys)
    assert made == [("FastModel", "FastAdamW"), ("Model", "AdamW")]


def test_checkpoints_are_written_beside_the_loop_from_a_still_state(corpus, tmp_path, capsys, monkeypatch):
    """The saves at steps 10 and 20 run on another thread while the loop goes on, and the
    weights and moments they write do not change until they are written (a slow disk here: 0.3 s)."""
    saves = []

    def slow_save(path, tensors, meta):
        before = {name: array.copy() for name, array in tensors.items()}
        time.sleep(0.3)
        save_checkpoint(path, tensors, meta)
        unchanged = all(np.array_equal(before[name], array) for name, array in tensors.items())
        saves.append((meta["step"], threading.current_thread() is threading.main_thread(), unchanged))
    from transformer import saving
    monkeypatch.setattr(saving, "save_checkpoint", slow_save)
    run_main(["--data", corpus, *TINY, "--out", tmp_path / "m.ckpt"], capsys)
    assert saves == [(10, False, True), (20, False, True), (30, False, True)]
    assert load_state(tmp_path / "m.ckpt")[1]["step"] == 30


@pytest.mark.parametrize("at_step", [10, 30])  # a save in the background, and the final one
def test_a_failed_save_is_one_sentence(corpus, tmp_path, capsys, monkeypatch, at_step):
    def full_disk(path, tensors, meta):
        if meta["step"] == at_step:
            raise OSError(28, "No space left on device")
        save_checkpoint(path, tensors, meta)
    from transformer import saving
    monkeypatch.setattr(saving, "save_checkpoint", full_disk)
    out = tmp_path / "m.ckpt"
    assert train.main([str(a) for a in ["--data", corpus, *TINY, "--out", out]]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write the checkpoint {out} (No space left on device); "
                   "the file there, if any, is the last good one\n")
    if at_step == 10:
        assert not out.exists()
    else:  # the save at step 20 is what the failed final one left in place
        assert load_state(out)[1]["step"] == 20


# ---- the command line: Ctrl-C while loading, --out without a folder, inference's output ------

INTERRUPT_AT_NUMPY = '''
"""Sends this process SIGINT when numpy is first imported, as a Ctrl-C in the first second would."""
import os, signal, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
'''


@pytest.mark.parametrize("script", ["train.py", "inference.py"])
def test_ctrl_c_while_importing_is_quiet(script, tmp_path):
    """Issue 16: Ctrl-C during the imports printed a KeyboardInterrupt traceback from numpy's
    insides; now the script just stops, as a shell expects (killed by SIGINT, nothing printed)."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_NUMPY)
    result = subprocess.run([sys.executable, os.path.join(REPO, script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode in (-2, 130), result.stdout + result.stderr
    assert result.stderr == "" and result.stdout == ""
    assert set(os.listdir(tmp_path)) <= {"sitecustomize.py", "__pycache__"}  # no model/ begun


def test_out_without_a_folder_then_the_default_run(corpus, tmp_path, capsys, monkeypatch):
    """Issue 13.3: `--out model` in a fresh folder saves the file model, its metrics beside it; a later
    plain run, inference.py and inspect then say how to reach it instead of failing obscurely."""
    import inference
    from transformer import inspect
    monkeypatch.chdir(tmp_path)
    common = ["--data", corpus, *TINY, "--max-iters", 3]
    run_main([*common, "--out", "model"], capsys)
    assert sorted(os.listdir(tmp_path)) == ["model", "model.metrics.jsonl"]
    assert load_state("model")[1]["step"] == 3

    message = (r"^error: the default checkpoint model/model\.ckpt needs a folder model, but model is a file "
               r"\(a run saved with --out model\?\); pass it by name \(--resume model, --ckpt model\) "
               r"or give another --out$")
    for command in (lambda: train.main([str(a) for a in common]), lambda: inference.main([]),
                    lambda: inspect.main([])):
        assert command() == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and re.match(message, err[0]), err
    assert train.main([str(a) for a in [*common, "--resume", "model", "--max-iters", 4]]) == 0
    assert inference.main(["--ckpt", "model", "--max-new-tokens", "3"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["model", "model.metrics.jsonl"]


def test_inference_prints_the_count_and_lists_parameters_only_when_asked(trained):
    """Issue 13.5: ~140 name/shape lines after the sample scrolled the text off the screen."""
    _, ckpt = trained
    stdout = run_script("inference.py", "--ckpt", ckpt, "--prompt", "The man", "--max-new-tokens", 5,
                        cwd=ckpt.parent)
    assert re.search(r"^Model parameters: [\d,]+$", stdout, re.M)
    assert not re.search(r"^  \S+: \(", stdout, re.M), stdout
    assert stdout.splitlines()[-1].startswith("Model parameters:")


def test_ctrl_c_during_generation_prints_the_text_so_far(trained, capsys, monkeypatch):
    """Issue 16: Ctrl-C during a long inference.py was a traceback and the text was lost; now
    sampling stops, the text so far is printed, and the exit code is 130."""
    import inference
    from transformer import generate
    _, ckpt = trained
    calls, real = [], generate.sample

    def sample(*args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # as the user presses Ctrl-C while token 5 is drawn
        return real(*args)
    monkeypatch.setattr(generate, "sample", sample)
    before = signal.getsignal(signal.SIGINT)
    code = inference.main(["--ckpt", str(ckpt), "--prompt", "The man", "--max-new-tokens", "1000"])
    out = capsys.readouterr().out
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is before
    text, _, _ = parse_inference(out)
    assert text.startswith("The man") and len(calls) == 5
    assert re.search(r"^Generated 5 tokens in .*; interrupted before the 1000 asked for$", out, re.M), out


# ---- a run you can watch: samples, progress lines, time_s, no evaluation twice ----------------

def without_time(meta):
    """meta with run.time_s left out: the seconds a run took differ between two runs."""
    return {**meta, "run": {k: v for k, v in meta["run"].items() if k != "time_s"}}


def test_samples_do_not_change_the_run(corpus, tmp_path, capsys):
    """A run printing a sample every 2 steps trains bit for bit as one printing none: dropout on,
    8 steps; the same weights, moments, saved settings and logged losses."""
    runs = {}
    for every in (2, 0):
        out = run_main(["--data", corpus, *TINY, "--max-iters", 8, "--eval-interval", 3, "--dropout", 0.3,
                        "--sample-interval", every, "--out", tmp_path / f"s{every}.ckpt"], capsys)
        samples = re.findall(r"^Sample at step (\d+): \".*\"$", out, re.M)
        assert samples == (["2", "4", "6", "8"] if every else []), out
        runs[every] = load_state(tmp_path / f"s{every}.ckpt"), metrics_losses(tmp_path / f"s{every}.metrics.jsonl")
    ((a_tensors, a_meta), a_losses), ((b_tensors, b_meta), b_losses) = runs[2], runs[0]
    assert set(a_tensors) == set(b_tensors)
    assert all(np.array_equal(a_tensors[name], b_tensors[name]) for name in a_tensors)
    assert without_time(a_meta) == without_time(b_meta) and a_losses == b_losses


def test_a_piped_run_prints_progress_lines_and_a_sample(corpus, tmp_path, capsys, monkeypatch):
    """stdout not a terminal (as under capsys): a progress line at each PROGRESS_SECONDS (0 here:
    every step), and by default a sample every other evaluation and one at the end."""
    from transformer import progress
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0)
    no_progress = TINY.index("--no-progress")
    out = run_main(["--data", corpus, *TINY[:no_progress], *TINY[no_progress + 1:], "--max-iters", 25,
                    "--out", tmp_path / "m.ckpt"], capsys)
    lines = re.findall(r"^step (\d+)/25: loss \d+\.\d{3}, \d+ ms/step, [\d,]+ tokens/s$", out, re.M)
    assert lines == [str(step) for step in range(1, 26)], out
    assert re.findall(r"^Sample at step (\d+): ", out, re.M) == ["20", "25"]


def test_a_resumed_run_does_not_evaluate_its_step_twice_and_time_goes_on(corpus, tmp_path, capsys):
    """A run saved at step 10, evaluated step 10, then died (here: its later checkpoint is replaced
    by the step-10 copy).  Resumed, it does not evaluate step 10 again, and time_s goes on from the
    seconds the checkpoint had trained.  A checkpoint whose step was not evaluated (stopped between
    steps) gets its evaluation."""
    out = tmp_path / "m.ckpt"
    common = ["--data", corpus, *TINY, "--eval-interval", 5, "--sample-interval", 0]
    run_main([*common, "--out", out, "--max-iters", 10], capsys)
    at_10 = tmp_path / "at10.ckpt"
    shutil.copy(out, at_10)
    printed = run_main(["--resume", out, "--max-iters", 11, "--no-progress"], capsys)
    assert [s for s, *_ in step_lines(printed)] == [10]  # not evaluated by the run that saved step 10
    shutil.copy(at_10, out)  # as if the run died after evaluating step 10
    printed = run_main(["--resume", out, "--max-iters", 15, "--no-progress"], capsys)
    assert [s for s, *_ in step_lines(printed)] == [14]
    records = [json.loads(line) for line in open(tmp_path / "m.metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 5, 9, 10, 14]
    times = [r["time_s"] for r in records]
    saved_time = load_state(at_10)[1]["run"]["time_s"]
    assert times[2] <= saved_time <= times[3] and times[3] < times[4], (times, saved_time)
    assert load_state(out)[1]["run"]["time_s"] > times[4]


def test_keep_best_saves_the_lowest_validation_loss_and_resumes_from_it(corpus, tmp_path, capsys):
    """--keep best with a rate that overshoots: out holds the weights of the evaluation with the
    lowest validation loss (the state of a --keep last run saved at that step), and a resumed run
    goes on from it without evaluating it again, saving only an evaluation that beats it."""
    common = ["--data", corpus, *TINY, "--eval-interval", 2, "--max-iters", 15, "--learning-rate", 3e-2,
              "--sample-interval", 0]
    best = tmp_path / "best.ckpt"
    printed = run_main([*common, "--keep", "best", "--out", best], capsys)
    records = [json.loads(line) for line in open(tmp_path / "best.metrics.jsonl")]
    low = min(records, key=lambda r: r["valid_loss"])
    assert 0 < low["step"] < records[-1]["step"], records  # a later evaluation was worse: not saved
    tensors, meta = load_state(best)
    assert meta["step"] == low["step"] and meta["run"]["best_valid_loss"] == low["valid_loss"]
    assert meta["run"]["keep"] == "best"
    assert printed.splitlines()[-1].endswith(
        f"The best checkpoint (step {low['step']}, validation loss {low['valid_loss']:.3f}) is at {best}")
    last = tmp_path / "last.ckpt"  # the same run, saving every step, stopped at the best step
    run_main([*common, "--out", last, "--max-iters", low["step"]], capsys)
    same, _ = load_state(last)
    assert all(np.array_equal(tensors[name], same[name]) for name in same)

    printed = run_main(["--resume", best, "--max-iters", 30, "--no-progress"], capsys)
    again = [json.loads(line) for line in open(tmp_path / "best.metrics.jsonl")][len(records):]
    assert again and again[0]["step"] > low["step"]  # the best step is not evaluated twice
    tensors, meta = load_state(best)
    lowest = min([low, *again], key=lambda r: r["valid_loss"])
    assert meta["step"] == lowest["step"] and meta["run"]["best_valid_loss"] == lowest["valid_loss"]


def test_keep_best_with_a_save_interval_is_refused(corpus, tmp_path, capsys):
    assert train.main([str(a) for a in ["--data", corpus, *TINY, "--keep", "best", "--save-interval", 5,
                                        "--out", tmp_path / "m.ckpt"]]) == 2
    assert capsys.readouterr().err == ("error: --keep best saves at the evaluations that improve the validation "
                                       "loss; leave out --save-interval (it sets when --keep last saves)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_changed_batch_on_resume_is_said(corpus, tmp_path, capsys):
    """--grad-accum-steps on resume changes the batch the run trained with: one line says so."""
    out = tmp_path / "m.ckpt"
    run_main(["--data", corpus, *TINY, "--max-iters", 2, "--out", out], capsys)
    printed = run_main(["--resume", out, "--max-iters", 3, "--grad-accum-steps", 2, "--no-progress"], capsys)
    assert (f"Note: {out} was trained on 1 micro-batch a step; this run adds 2 (1 process x --grad-accum-steps 2), "
            "so its batch differs from the run it continues") in printed.splitlines()
    printed = run_main(["--resume", out, "--max-iters", 4, "--no-progress"], capsys)
    assert "Note:" not in printed  # the checkpoint now holds 2, and the run keeps it
    assert load_state(out)[1]["run"]["grad_accum_steps"] == 2


def test_ctrl_c_under_keep_best_keeps_the_best(corpus, tmp_path):
    """Stopped by a signal, a --keep best run does not save its last step over the best one: it
    says which step out holds, and resuming it goes on from there."""
    out = tmp_path / "m.ckpt"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--data", str(corpus), "--out", str(out),
                             *TINY, "--keep", "best", "--max-iters", "100000", "--eval-interval", "100000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("Step: 0"):
                time.sleep(0.5)  # some steps past the best (the only) evaluation
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(seen) + rest + err
    loss = step_lines("".join(seen))[0][2]
    message = re.search(r"^Interrupted after step (\d+); the best checkpoint \(step 0, validation loss "
                        rf"{loss:.3f}\) is at {re.escape(str(out))}\. Resume with: python train\.py --resume "
                        rf"{re.escape(str(out))}$", rest, re.M)
    assert message and int(message[1]) > 0, rest
    assert load_state(out)[1]["step"] == 0
