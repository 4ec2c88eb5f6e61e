"""Tests for benchmarks/bench_gpu.py's verdicts (the timing itself needs a GPU: gpu_check.sh runs it)."""
import types

import pytest

from benchmarks import bench_gpu


@pytest.mark.parametrize("ours, theirs, ok", [
    (10.5, 10.5, True),
    (10.5 * (1 + 0.9 * bench_gpu.LOSS_RTOL), 10.5, True),
    (10.5 * (1 + 2 * bench_gpu.LOSS_RTOL), 10.5, False),  # a wrong kernel is off by far more
    (float("nan"), 10.5, False),
    (10.5, float("nan"), False),
])
def test_loss_check(ours, theirs, ok):
    got, line = bench_gpu.loss_check("book", ours, theirs)
    assert got is ok
    assert line.startswith(f"loss check: book: {'PASS' if ok else 'FAIL'}, ")


def run(monkeypatch, bench_config):
    """run_configs over 'book' with bench_config replaced and the rate measurement faked."""
    monkeypatch.setattr(bench_gpu, "bench_config", bench_config)
    monkeypatch.setattr(bench_gpu, "measure_rates", lambda *args: (1e14, 1e12))
    args = types.SimpleNamespace(steps=4, warmup=1, vocab=bench_gpu.VOCAB)
    lines = []
    return bench_gpu.run_configs(None, None, ["book"], args, lines, sync=lambda: None), lines


def test_a_crashing_config_is_a_failure(monkeypatch):
    def crash(*args):
        raise RuntimeError("out of memory")
    (checks, failures), lines = run(monkeypatch, crash)
    assert failures == ["book crashed (RuntimeError: out of memory)"]
    assert "| failed | RuntimeError: out of memory |" in lines[-1]


def test_disagreeing_losses_are_a_failure_and_still_timed(monkeypatch):
    times = {impl: [5.0, 6.0, 7.0] for impl in bench_gpu.IMPLS}
    memory = {"cupy": 100.0, "torch": 90.0}
    (checks, failures), lines = run(monkeypatch, lambda *a: (times, bench_gpu.loss_check("book", 11.0, 10.0), memory))
    assert failures == ["book's losses disagree"] and checks[0].startswith("loss check: book: FAIL")
    assert len(lines) == len(bench_gpu.IMPLS)  # one timing row per implementation
    (checks, failures), _ = run(monkeypatch, lambda *a: (times, bench_gpu.loss_check("book", 10.0, 10.0), memory))
    assert failures == []


def test_unknown_config_and_missing_cupy_exit_2(monkeypatch, capsys):
    assert bench_gpu.main(["--configs", "book,huge"]) == 2
    assert capsys.readouterr().err == "error: unknown config 'huge'; choose from book, large.\n"
    from nanograd import backend
    monkeypatch.setattr(backend, "cupy_unavailable_reason", lambda: "CuPy is installed but no CUDA device is visible")
    assert bench_gpu.main(["--configs", "book"]) == 2
    assert capsys.readouterr().err.startswith("error: --backend cupy cannot run")


def fake_cupy():
    """What main() reads of CuPy before benchmarking: device name and versions."""
    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU"}, runtimeGetVersion=lambda: 12090,
                                    driverGetVersion=lambda: 12090, deviceSynchronize=lambda: None)
    return types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(
        runtime=runtime, Device=lambda: types.SimpleNamespace(id=0)))


@pytest.mark.parametrize("failures, status", [([], 0), (["book crashed (RuntimeError: boom)"], 1),
                                              (["book's losses disagree"], 1)])
def test_exit_status_follows_the_failures(monkeypatch, capsys, tmp_path, failures, status):
    """A crashed config or a loss mismatch used to end with exit 0; now 1."""
    import torch
    from nanograd import backend
    monkeypatch.setattr(backend, "get_backend", lambda name: fake_cupy())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu, "run_configs", lambda *args: (["loss check: book: ..."], failures))
    assert bench_gpu.main(["--configs", "book", "--out", str(tmp_path / "bench.md")]) == status
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == ("bench: PASS" if not failures else f"bench: FAIL: {failures[0]}")
    assert (tmp_path / "bench.md").read_text().startswith("GPU: Fake GPU;")
