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
from nanograd.gradcheck import ATOL, REL_FLOOR, RTOL, FAST_PATH, check_kernel, compare, numerical_gradient, standard_cases
from nanograd.layernorm import layernorm_forward

ROOT = Path(__file__).resolve().parents[1]


def expected_rows():
    """(kernel, input) for every input of every standard case, in order."""
    return [(case.kernel, name) for case in standard_cases(np) for name in case.names]


def table_rows(stdout):
    """The table's rows, split into words, the fast path's * taken off the kernel's name."""
    rows = [line.split() for line in stdout.splitlines() if line.rstrip().endswith((" ok", " FAIL"))]
    return [[row[0].rstrip("*"), *row[1:]] for row in rows]


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
    rows = table_rows(result.stdout)
    assert [(r[0], r[1]) for r in rows] == expected_rows()
    assert all(r[-1] == "ok" for r in rows)
    n = len(rows)
    assert n == 31  # 17 kernel inputs, and the block's x and 13 parameters
    assert [r[1] for r in rows if r[0] == "block"] == ["x", "ln1_w", "ln1_b", "Wq", "Wk", "Wv", "proj_W", "proj_b",
                                                       "ln2_w", "ln2_b", "fc1_W", "fc1_b", "fc2_W", "fc2_b"]
    assert f"{n} of {n} gradients agree" in result.stdout
    assert result.stdout.startswith("sizes: B=2 T=5 C=8 NH=2 V=11 hs=4, dropout p=0.3")
    assert "python -m transformer.gradcheck" in result.stdout  # where the whole model's row is


def test_fast_path_rows_are_marked():
    out = io.StringIO()
    assert gradcheck.run(np, 0, file=out, kernel="linear_cross_entropy")
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("linear_cross_entropy* ") for line in lines) == 3
    assert "linear_cross_entropy*: fast path, nanograd/fast/linear_cross_entropy.py" in out.getvalue()
    assert set(FAST_PATH) == {c.kernel for c in standard_cases(np)} - {
        "embedding", "linear", "relu", "dropout", "layernorm", "attention", "cross_entropy", "block"}
    plain = io.StringIO()
    assert gradcheck.run(np, 0, file=plain, kernel="layernorm")
    assert not any(line.startswith("layernorm*") for line in plain.getvalue().splitlines())
    assert "fast path" not in plain.getvalue()


@pytest.mark.parametrize("kernel", ["attention", "block", "cross_entropy"])
def test_kernel_flag_checks_that_kernel_alone(kernel, capsys):
    assert gradcheck.main(["--kernel", kernel]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [(r[0], r[1]) for r in rows] == [row for row in expected_rows() if row[0] == kernel]


@pytest.mark.parametrize("argv, message", [
    (["--kernel", "model"], "argument --kernel: invalid choice: 'model'"),  # that row is transformer.gradcheck's
    (["--kernel", "softmax"], "argument --kernel: invalid choice: 'softmax'"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**63 - 1, got '-1'"),
    (["--kern", "relu"], "unrecognized arguments: --kern relu"),
], ids=["kernel-model", "kernel-unknown", "seed-negative", "abbreviated"])
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gradcheck.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_relative_error_only_where_the_tolerance_is_relative():
    """Where |n| <= ATOL/RTOL the tolerance is ATOL and the error is finite-difference noise: a
    relative error there says nothing, so max rel err leaves it out (nan, shown '-', when every
    entry is that small), while max abs err and the pass rule still see it."""
    assert REL_FLOOR == ATOL / RTOL > ATOL
    n = np.array([1e-9, 5e-8, 2e-7, 1e-4, 0.5, 2.0])
    a = n + np.array([1e-10, 1e-10, 5e-8, 5e-8, 1e-7, 4e-6])
    row = compare("k", "x", a, n)
    assert row.max_rel == pytest.approx(2e-6)  # 4e-6 / 2.0; not 0.1, 0.25 or 5e-4 below the floor
    assert row.max_abs == pytest.approx(4e-6) and row.ok
    tiny = compare("k", "x", np.array([3e-9, -2e-8, 1e-3]), np.array([1e-9, 1e-8, 1e-3 + 5e-8]))
    assert np.isnan(tiny.max_rel) and tiny.ok
    out = io.StringIO()
    gradcheck.print_table([tiny], file=out)
    assert out.getvalue().splitlines()[3].split()[3] == "-"  # kernel, input, max abs err, max rel err


def test_worst_index_is_where_err_over_tol_is_largest_and_shows_a_and_n_there():
    """One criterion: the worst index is the argmax of err/tol, the column beside it is that
    maximum, and analytic and numerical are the two gradients at that index.  Here the largest
    absolute error (index 0, on a big gradient) is not the entry nearest to failing (index 2)."""
    n = np.array([100.0, 1.0, 1e-3])
    a = n + np.array([5e-4, 1e-6, 1e-7])  # err/tol: 5e-4 / 1.0001e-3, 1e-6 / 1.01e-5, 1e-7 / 1.1e-7
    row = compare("k", "x", a, n)
    assert row.worst_index == (2,)
    assert (row.analytic, row.numerical) == (a[2], n[2])
    assert row.err_over_tol == pytest.approx(1e-7 / (ATOL + RTOL * 1e-3))
    assert row.max_abs == pytest.approx(5e-4) and row.ok
    failing = compare("k", "x", n + np.array([0.0, 2e-5, 0.0]), n)
    assert failing.worst_index == (1,) and failing.err_over_tol > 1 and not failing.ok


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
    err_over_tol = np.abs(dx - numerical) / (ATOL + RTOL * np.abs(numerical))
    assert worst == np.unravel_index(np.argmax(err_over_tol), x.shape)
    assert by_name["x"].err_over_tol == err_over_tol[worst] > 1
    assert (by_name["x"].analytic, by_name["x"].numerical) == (dx[worst], numerical[worst])


def test_broken_kernel_fails_the_table(monkeypatch):
    """run() and main() report a broken kernel: FAIL in the table, exit status 1."""
    monkeypatch.setattr(nanograd, "layernorm_backward", layernorm_backward_without_rstd_path)
    out = io.StringIO()
    assert gradcheck.run(np, 0, file=out) is False
    fails = [row[:2] for row in table_rows(out.getvalue()) if row[-1] == "FAIL"]
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
    assert err.startswith("error: --backend cupy cannot run: ")
