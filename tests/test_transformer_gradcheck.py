"""Tests for transformer/gradcheck.py: the whole-model row of the gradient check."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanograd import gradcheck as kernel_gradcheck
from nanograd.backend import cupy_unavailable_reason
from nanograd.block import PLAIN_KERNELS, block_backward
from transformer import gradcheck
from transformer.model import Model

ROOT = Path(__file__).resolve().parents[1]


def model_rows(seed=0):
    case, note = gradcheck.model_case(np, seed)
    rows = kernel_gradcheck.check_kernel(*case, seed=seed)
    return case, rows, note(rows)


def test_the_model_row_passes_and_names_its_worst_entry():
    case, (row,), note = model_rows()
    assert row.ok and (row.kernel, row.input) == ("model", "params")
    assert row.max_abs < 1e-8 and row.err_over_tol < 0.1, row  # a correct walk is far inside the tolerance
    n_params = len(Model(gradcheck.MODEL_H_PARAMS, dtype="float64").params)
    assert case.inputs[0].shape == (gradcheck.ENTRIES_PER_PARAM * n_params,)  # every parameter, twice
    assert f"of each of its {n_params} parameters; worst {row.worst_index} is " in note


def test_a_block_backward_without_its_skip_path_fails_only_the_model_row(monkeypatch):
    """Each kernel is right, the walk is wrong: the kernel rows cannot see it, the model row does."""
    def walk_without_skip(dout, caches):  # the gradient along each block's skip connections left out
        dblocks = [None] * len(caches)
        for i in reversed(range(len(caches))):
            dx, dblocks[i] = block_backward(dout, caches[i])
            dout = dx - dout
        return dout, dblocks

    monkeypatch.setattr(PLAIN_KERNELS, "blocks_backward", walk_without_skip)  # the table Model's walk calls
    (row,) = model_rows()[1]
    assert not row.ok and row.err_over_tol > 100
    assert kernel_gradcheck.run(np, 0, file=io.StringIO(), kernel="block")  # the block itself still passes


def test_other_seeds_pass():
    for seed in (1, 2):
        assert model_rows(seed)[1][0].ok


def test_command_line_is_the_kernel_table_plus_the_model():
    result = subprocess.run([sys.executable, "-m", "transformer.gradcheck"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.rstrip().endswith((" ok", " FAIL"))]
    kernel_rows = [(c.kernel, name) for c in kernel_gradcheck.standard_cases(np) for name in c.names]
    assert [(r[0].rstrip("*"), r[1]) for r in rows] == kernel_rows + [("model", "params")]
    assert all(r[-1] == "ok" for r in rows)
    assert f"{len(rows)} of {len(rows)} gradients agree" in result.stdout
    assert "model: transformer.Model(d_model=8, num_blocks=2" in result.stdout
    assert "python -m transformer.gradcheck" not in result.stdout  # the pointer is for nanograd's table


def test_kernel_model_alone(capsys):
    assert gradcheck.main(["--kernel", "model"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if line.endswith(" ok")] == [["model", "params"]]


def test_cupy_without_device_is_one_line_and_exit_2(capsys):
    if cupy_unavailable_reason() is None:
        pytest.skip("CuPy runs on this machine")
    assert gradcheck.main(["--backend", "cupy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --backend cupy cannot run: ")
