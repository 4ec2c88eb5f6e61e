"""Tests for benchmarks/gpu_env.py: every line it prints, on this machine and with a stand-in CuPy."""
import types

from benchmarks import gpu_env


def test_without_cupy_it_prints_the_host_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(gpu_env, "cupy_packages", lambda: "none")
    from nanograd import backend
    monkeypatch.setattr(backend, "cupy_unavailable_reason", lambda: "CuPy is installed but no CUDA device is visible")
    assert gpu_env.main() == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("python 3.")
    assert [line.split(":")[0] for line in out[1:1 + len(gpu_env.PACKAGES)]] == list(gpu_env.PACKAGES)
    assert "CuPy package: none" in out and any(line.startswith("mpiexec: ") for line in out)
    assert out[-1] == "cupy_unavailable_reason: CuPy is installed but no CUDA device is visible"


def fake_cupy(nvrtc_fails=False):
    """What gpu_lines reads of CuPy: the device, its memory and the library versions."""
    def nvrtc_version():
        if nvrtc_fails:
            raise RuntimeError("libnvrtc.so.13: cannot open shared object file")
        return (13, 0)
    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"NVIDIA H200", "multiProcessorCount": 132},
        memGetInfo=lambda: (140 * 2**30, 143 * 2**30), driverGetVersion=lambda: 13000,
        runtimeGetVersion=lambda: 13000)
    device = types.SimpleNamespace(id=0, compute_capability="90")
    cuda = types.SimpleNamespace(runtime=runtime, Device=lambda: device,
                                 nvrtc=types.SimpleNamespace(getVersion=nvrtc_version))
    return types.SimpleNamespace(__version__="14.2.0", cuda=cuda)


def test_the_gpu_lines_and_a_library_that_cannot_be_read(monkeypatch):
    monkeypatch.setattr(gpu_env, "nccl_version", lambda: 22703)
    lines = gpu_env.gpu_lines(fake_cupy())
    assert lines == ["GPU: NVIDIA H200, compute capability 90, 132 SMs, 143.0 GiB (140.0 GiB free)",
                     "driver (CUDA version it supports): 13000", "CUDA runtime: 13000", "NVRTC: 13.0",
                     "NCCL: 22703", "cupy: 14.2.0"]
    lines = gpu_env.gpu_lines(fake_cupy(nvrtc_fails=True))
    assert "NVRTC: unavailable (RuntimeError: libnvrtc.so.13: cannot open shared object file)" in lines
