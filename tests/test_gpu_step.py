"""Tests for benchmarks/gpu_step.py with its stand-ins: NumPy for CuPy, torch on the CPU for CUDA.

On the GPU machine gpu_check.sh runs the same code with CuPy and torch on CUDA;
here every line but the device runs, and a broken backward or AdamW must fail it.
"""
import numpy as np
import pytest

from benchmarks import gpu_step
from nanograd import AdamW
from transformer.fast_model import FastModel
from transformer.model import parameter_shapes


def test_the_stand_in_step_passes_every_check(tmp_path, capsys):
    assert gpu_step.main(["--stand-in", "--config", "small", "--out", str(tmp_path / "step.md")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("step: PASS (")
    h = gpu_step.CONFIGS["small"]
    names = list(parameter_shapes(h))
    rows = [line for line in (tmp_path / "step.md").read_text().splitlines() if line.startswith("| float")]
    # per dtype and path: the loss, then every gradient, then every parameter after the step
    assert len(rows) == 2 * 2 * (1 + 2 * len(names))
    for dtype in ("float32", "float64"):
        for path in ("fused", "plain"):
            mine = [r.split(" | ")[2] for r in rows if r.startswith(f"| {dtype} | {path} |")]
            assert mine == ["loss"] + [f"d {n}" for n in names] + [f"{n} after the step" for n in names]
            assert f"ok: {dtype} {path}: loss " in out
    assert all(r.endswith("| PASS |") for r in rows)


class NoDecayAdamW(AdamW):
    """AdamW that forgets its weight decay: off by 0.01 lr p, under 1% of a step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, weight_decay=0.0)


class SkewedFastModel(FastModel):
    """FastModel whose LayerNorm weight gradients are 0.1% too large."""

    def backward(self):
        grads = super().backward()
        for name, g in grads.items():
            if name.endswith("ln1.weight"):
                g *= 1.001
        return grads


@pytest.mark.parametrize("path, broken, caught", [
    ("plain", (gpu_step.Model, NoDecayAdamW), "after the step"),
    ("fused", (SkewedFastModel, gpu_step.FastAdamW), "ln1.weight"),
])
def test_a_small_error_in_the_update_or_a_gradient_fails(monkeypatch, capsys, path, broken, caught):
    import torch
    monkeypatch.setattr(gpu_step, "PATHS", {path: broken})
    rows = gpu_step.run(torch, "numpy", "cpu", "small", dtypes=("float32",))
    failed = [r for r in rows if not r[5]]
    assert failed and all(caught in r[2] for r in failed)
    if caught == "after the step":  # the large weights move too far: the LayerNorms' ~1, the embedding's ~4
        names = {r[2] for r in failed}
        assert "token_embedding_lookup_table.weight after the step" in names
        assert {"transformer_blocks.0.ln1.weight after the step", "transformer_blocks.2.weight after the step"} <= names
    assert capsys.readouterr().out.startswith(f"  FAIL: float32 {path}: ")


def test_errors_are_measured_against_scale_and_nan_fails():
    assert gpu_step.scale_error(np.array([1.0, 2.001]), np.array([1.0, 2.0]), 2.0) == pytest.approx(5e-4)
    assert gpu_step.scale_error(np.array([np.nan]), np.array([1.0]), 1.0) == float("inf")
    assert gpu_step.scale_error(np.zeros(2), np.zeros(3), 1.0) == float("inf")
    rows = gpu_step.compare("float32", "fused", (None, float("nan"), {}, {}), (2.0, {}, {}))
    assert rows == [("float32", "fused", "loss", float("inf"), gpu_step.GRAD_TOL["float32"], False)]


def test_without_cupy_it_exits_2(monkeypatch, capsys):
    from nanograd import backend
    monkeypatch.setattr(backend, "cupy_unavailable_reason", lambda: "CuPy is installed but no CUDA device is visible")
    assert gpu_step.main(["--config", "small"]) == 2
    assert capsys.readouterr().err.startswith("error: --backend cupy cannot run: CuPy is installed but no CUDA")
