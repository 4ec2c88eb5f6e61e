"""Tests for nanograd/gradcheck.py: the checker itself must catch wrong gradients."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nanograd
from nanograd import gradcheck
from nanograd.backend import cupy_unavailable_reason
from nanograd.gradcheck import ATOL, RTOL, check_kernel, numerical_gradient, standard_cases
from nanograd.layernorm import layernorm_forward

ROOT = Path(__file__).resolve().parents[1]


def expected_rows():
    """(kernel, input) for every input of every standard case, in order."""
    return [(case[0], name) for case in standard_cases(np) for name in case[5]]


def layernorm_backward_without_rstd_path(dout, cache):
    """LayerNorm backward with the `- xhat * mean(dxhat * xhat)` term dropped."""
    x, w, mean, rstd = cache
    C = x.shape[-1]
    xhat = (x - mean) * rstd  # (..., C)
    dxhat = dout * w  # (..., C)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True))  # (..., C) missing a term
    return dx, (dout * xhat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)


def test_main_passes(xp, capsys):
    """The whole table passes on each backend (CuPy skipped without a device)."""
    assert gradcheck.main([] if xp is np else ["--backend", "cupy"]) == 0
    out = capsys.readouterr().out
    n = len(expected_rows())
    assert f"{n} of {n} gradients agree" in out
    assert "FAIL" not in out


def test_every_standard_case_agrees_with_torch():
    for case in standard_cases(np, seed=3):
        for row in check_kernel(*case, seed=3):
            assert row.ok, row
            # float64 on both sides, the same formulas: rounding differences only
            assert row.torch_abs < 1e-12, row


def test_command_line_prints_one_row_per_input():
    result = subprocess.run([sys.executable, "-m", "nanograd.gradcheck"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line.split() for line in result.stdout.splitlines()]
    rows = [r for r in table if len(r) > 2 and r[-1] in ("ok", "FAIL")]
    assert [(r[0], r[1]) for r in rows] == expected_rows()
    assert all(r[-1] == "ok" for r in rows)
    n = len(rows)
    assert n == 17
    assert f"{n} of {n} gradients agree" in result.stdout


def test_broken_layernorm_backward_is_caught():
    case = next(c for c in standard_cases(np) if c[0] == "layernorm")
    kernel, forward, _, inputs, wrt, names, torch_forward = case
    rows = check_kernel(kernel, forward, layernorm_backward_without_rstd_path, inputs, wrt, names,
                        torch_forward)
    by_name = {r.input: r for r in rows}
    assert not by_name["x"].ok
    assert by_name["w"].ok and by_name["b"].ok  # only dx lost a term
    assert by_name["x"].max_abs > 1e-2 and by_name["x"].torch_abs > 1e-2

    # worst_index names the element that misses its tolerance by the most
    x = inputs[0]
    worst = by_name["x"].worst_index
    assert len(worst) == x.ndim and all(0 <= i < n for i, n in zip(worst, x.shape))
    dout = np.random.default_rng(0).standard_normal(x.shape)  # check_kernel's upstream gradient, seed 0
    dx = layernorm_backward_without_rstd_path(dout, forward(*inputs)[1])[0]
    numerical = numerical_gradient(lambda: float((forward(*inputs)[0] * dout).sum()), x)
    excess = np.abs(dx - numerical) - (ATOL + RTOL * np.abs(numerical))
    assert worst == np.unravel_index(np.argmax(excess), x.shape)
    assert excess[worst] > 0


def test_broken_kernel_fails_the_table(monkeypatch):
    """run() and main() report a broken kernel: FAIL in the table, exit status 1."""
    monkeypatch.setattr(nanograd, "layernorm_backward", layernorm_backward_without_rstd_path)
    out = io.StringIO()
    assert gradcheck.run(np, 0, file=out) is False
    fails = [line.split()[:2] for line in out.getvalue().splitlines() if line.rstrip().endswith("FAIL")]
    assert fails == [["layernorm", "x"]]
    assert gradcheck.main([]) == 1


def test_a_gradient_wrong_only_where_sum_out_cannot_see_is_caught():
    """With w = 1 and b = 0 every LayerNorm row sums to 0, so d sum(out) / dx = 0:
    a backward returning dx = 0 passes a sum(out) check.  The random upstream
    gradient catches it."""
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((2, 3, 4)), np.ones(4), np.zeros(4)]

    def zero_dx(dout, cache):
        dx, dw, db = nanograd.layernorm_backward(dout, cache)
        return np.zeros_like(dx), dw, db

    sum_out = lambda: float(layernorm_forward(*inputs)[0].sum())  # noqa: E731
    assert np.abs(numerical_gradient(sum_out, inputs[0])).max() < 1e-8  # blind to dx
    rows = check_kernel("layernorm", layernorm_forward, zero_dx, inputs, [0, 1, 2], ["x", "w", "b"])
    assert [r.ok for r in rows] == [False, True, True]


@pytest.mark.parametrize("scale, ok", [(1 + 0.5 * RTOL, True), (1 + 3 * RTOL, False)])
def test_pass_rule_is_atol_plus_rtol(scale, ok):
    """A row passes when |a - n| <= ATOL + RTOL |n| everywhere: a gradient off by
    half of RTOL passes, one off by three times RTOL fails."""
    x = np.random.default_rng(2).standard_normal((3, 4)) * 10

    def forward(x):
        return 2 * x, None

    def backward(dout, cache):
        return 2 * dout * scale
    (row,) = check_kernel("double", forward, backward, [x], [0], ["x"])
    assert row.ok is ok
    assert np.isnan(row.torch_abs)  # no torch_forward given


def test_numerical_gradient_restores_input():
    x = np.random.default_rng(3).standard_normal((2, 3))
    before = x.copy()
    grad = numerical_gradient(lambda: float((x ** 3).sum()), x)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(grad, 3 * before ** 2, rtol=1e-8, atol=1e-8)


def test_other_seeds_pass():
    assert gradcheck.run(np, seed=7, file=io.StringIO())


def test_cupy_without_device_exits_2(capsys):
    if cupy_unavailable_reason() is None:
        pytest.skip("CuPy runs on this machine")
    assert gradcheck.main(["--backend", "cupy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(".") and cupy_unavailable_reason() in err
