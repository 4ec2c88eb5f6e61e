"""transformer/progress.py: what a run prints and logs while it trains.

RunLog's clock is replaced by a fake one here, so the progress lines' timing is exact;
the sample is checked to leave the model and its random streams as it found them (that
a whole run trains bit for bit the same with samples is tests/test_train.py's)."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from transformer import progress
from transformer.errors import UserError
from transformer.model import Model
from transformer.progress import RunLog, TrainingSample, import_wandb
from transformer.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # train.py is a script at the repository root
    sys.path.insert(0, str(REPO))
import train  # noqa: E402

PROGRESS = re.compile(r"^step (\d+)/(\d+): loss (\d+\.\d{3}), (\d+) ms/step, ([\d,]+) tokens/s$")


class Clock:
    """time.perf_counter for progress.py, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class Records:
    """RunOutputs' log(), keeping the records."""

    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    return clock


def test_without_a_terminal_a_progress_line_every_ten_seconds(clock, capsys):
    """Steps of 3 s: a line once 10 s have passed (after 4 steps), giving the mean loss and the
    time of the steps alone: the 5 s evaluation in between counts toward the 10 s, not the ms/step."""
    log = RunLog(Records(), start=0, total=100, tokens_per_step=64, progress=True)
    losses = iter([4.0, 3.0, 2.0, 1.0, 5.0, 6.0])
    for step in range(4):
        clock.now += 3
        log.step(step, next(losses))
    clock.now += 5
    log.evaluation(4, {"train": 1.0, "valid": 1.5}, 1e-3)
    for step in range(4, 6):  # 5 s + 2 x 3 s = 11 s since the last line, 6 s of it stepping
        clock.now += 3
        log.step(step, next(losses))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 4/100: loss 2.500, 3000 ms/step, 21 tokens/s",
                     "Step: 4, Training Loss: 1.000, Validation Loss: 1.500",
                     "step 6/100: loss 5.500, 3000 ms/step, 21 tokens/s"]
    assert all(PROGRESS.match(line) for line in lines[::2])


@pytest.mark.parametrize("enabled", [False, True], ids=["no-progress", "terminal"])
def test_no_progress_lines_under_no_progress_or_on_a_terminal(clock, capsys, monkeypatch, enabled):
    """--no-progress prints none; a terminal has the bar instead (a stand-in here)."""
    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass
    monkeypatch.setattr(progress, "progress_bar", lambda start, total, enabled: Bar() if enabled else None)
    log = RunLog(Records(), start=0, total=100, tokens_per_step=64, progress=enabled)
    for step in range(10):
        clock.now += 30
        log.step(step, 1.0)
    assert capsys.readouterr().out == ""


def test_time_s_goes_on_from_the_resumed_runs(clock):
    """A resumed run's metrics count from the seconds its checkpoint had trained."""
    records = Records()
    log = RunLog(records, start=20, total=40, tokens_per_step=64, progress=False, time_before=123.5)
    clock.now += 2.25
    log.evaluation(20, {"train": 1.0, "valid": 1.0}, 1e-3)
    assert records.records[0]["time_s"] == 125.75
    assert log.training_seconds() == 125.75 and log.seconds() == 2.25  # the last line times this process


def test_a_sample_is_one_quoted_line(clock, capsys):
    RunLog(Records(), 0, 10, 64, progress=False).sample(7, 'a "b"\nc')
    assert capsys.readouterr().out == 'Sample at step 7: "a \\"b\\"\\nc"\n'


# ---- the sample -------------------------------------------------------------------------

H = dict(d_model=16, num_blocks=1, num_heads=2, context_length=8, dropout=0.5, max_token_value=300)


def test_the_sample_starts_from_a_newline_when_the_data_has_one():
    tokenizer = get_tokenizer()
    newline = tokenizer.encode_ordinary("\n")[0]
    with_newline = np.array([5, 7, newline, 9])
    assert TrainingSample(with_newline, None, 1, tokenizer).prompt.tolist() == [[newline]]
    assert TrainingSample(np.array([5, 7, 9]), None, 1, tokenizer).prompt.tolist() == [[5]]  # else the first
    vocab = np.array([3, newline, 400])  # --compact-vocab: the model's ids are positions in vocab
    assert TrainingSample(np.array([2, 1, 0]), vocab, 1, tokenizer).prompt.tolist() == [[1]]
    assert TrainingSample(np.array([2, 0]), np.array([3, 4, 400]), 1, tokenizer).prompt.tolist() == [[2]]


def test_the_sample_leaves_the_model_and_its_streams_alone():
    """Same text each time from the same weights; dropout back on after it; the dropout generator,
    the weights and the forward cache the next backward() reads untouched."""
    model = Model(H, seed=3)
    x = np.arange(8)[None] % 300
    model(x, x)
    cache, state = model.cache, model.rng.bit_generator.state
    params = {name: p.copy() for name, p in model.params.items()}
    sample = TrainingSample(np.array([10, 20, 30]), None, 1337, get_tokenizer(), new_tokens=12)
    text = sample.text(model)
    assert text == sample.text(model) and len(text) > 0
    assert model.training and model.cache is cache and model.rng.bit_generator.state == state
    assert all(np.array_equal(params[name], p) for name, p in model.params.items())
    expected = model.generate(np.array([[10]]), 12, temperature=progress.SAMPLE_TEMPERATURE,
                              rng=np.random.default_rng([1337, progress.SAMPLE_STREAM]))[0]
    assert text == get_tokenizer().decode(expected.tolist())


def test_the_sample_maps_compact_ids_back():
    """A --compact-vocab model's ids are decoded through vocab, not as cl100k ids."""
    tokenizer = get_tokenizer()
    words = tokenizer.encode_ordinary(" the file the list the value")
    vocab = np.unique(words)
    model = Model({**H, "max_token_value": len(vocab)}, seed=0)
    text = TrainingSample(np.searchsorted(vocab, words), vocab, 0, tokenizer, new_tokens=10).text(model)
    assert set(text.split()) <= {"the", "file", "list", "value"}, text


# ---- wandb: a missing package is found before any work ----------------------------------

def test_wandb_missing_is_found_before_the_data_is_read(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match=r"^--wandb needs the wandb package: pip install wandb"):
        import_wandb()
    monkeypatch.setattr(train, "tokenize", lambda *a: pytest.fail("tokenized before checking for wandb"))
    monkeypatch.setattr(train, "read_text", lambda *a: pytest.fail("read the data before checking for wandb"))
    assert train.main(["--wandb", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m.ckpt")]) == 2
    assert capsys.readouterr().err.startswith("error: --wandb needs the wandb package")
    assert list(tmp_path.iterdir()) == []
