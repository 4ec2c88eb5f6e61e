"""Tests for benchmarks/race_nanogpt.py: nanoGPT's vocabulary, schedule and a short run end to end."""
import math

import numpy as np
import pytest

from benchmarks import race_nanogpt


def test_char_ids_are_indices_into_the_sorted_characters():
    text = "ba\nab\u00e9!"
    ids, chars = race_nanogpt.char_ids(text)
    assert chars == sorted(set(text))
    assert "".join(chars[i] for i in ids) == text
    assert ids.dtype == np.int64


@pytest.mark.parametrize("step, expected", [
    (0, 1e-3 * 1 / 101),  # nanoGPT warms up from lr / (warmup + 1), not from 0
    (99, 1e-3 * 100 / 101),
    (100, 1e-3),
    (1050, 1e-4 + 0.5 * (1e-3 - 1e-4)),  # half way down the cosine
    (2000, 1e-4),
    (2001, 1e-4),
])
def test_schedule_is_nanogpts_get_lr(step, expected):
    assert race_nanogpt.nanogpt_lr(step, 1e-3, 1e-4, 100, 2000) == pytest.approx(expected, rel=1e-12)


def test_a_short_run_learns_and_reports(tmp_path, capsys):
    """40 steps on a repetitive text: the validation loss falls from ln(V) and the line reports it."""
    data = tmp_path / "text.txt"
    data.write_text("to be or not to be, that is the question. " * 60)
    reached = race_nanogpt.main(["--data", str(data), "--steps", "40", "--eval-interval", "20", "--eval-iters", "2",
                                 "--batch-size", "4", "--context-length", "16", "--d-model", "16",
                                 "--num-blocks", "1", "--num-heads", "2", "--warmup", "5", "--lr", "1e-2",
                                 "--target", "2.0"])
    out = capsys.readouterr().out
    losses = [float(line.split(" val ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 3  # steps 0, 20, 40
    assert losses[0] == pytest.approx(math.log(len(set(data.read_text()))), abs=0.5)
    assert losses[-1] < losses[0] - 0.5
    assert reached is not None and "reached val <= 2.0: step" in out
