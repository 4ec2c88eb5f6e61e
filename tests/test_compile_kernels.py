"""Tests for benchmarks/compile_kernels.py: what it compiles and how it reports, without NVRTC.

.ci/run runs the script itself, with CuPy's NVRTC installed in a venv, after
these tests; here a stand-in NVRTC records the calls, so the script's logic is
checked on any machine.
"""
import re
import sys
import types

import pytest

from benchmarks import compile_kernels
from nanograd.fast import counter_rng
from nanograd.fast import cuda_kernels


class FakeNVRTC:
    """The few nvrtc functions the script calls; programs whose source holds `broken` fail."""

    def __init__(self, broken=None, drop=None):
        self.broken, self.drop, self.compiled, self.open = broken, drop, [], 0

    def getVersion(self):
        return (12, 9)

    def createProgram(self, source, name, headers, include_names):
        self.open += 1
        return types.SimpleNamespace(source=source, name=name, names=[])

    def addNameExpression(self, prog, name):
        prog.names.append(name)

    def compileProgram(self, prog, options):
        if self.broken and self.broken in prog.source:
            raise RuntimeError("NVRTC_ERROR_COMPILATION (6)")
        self.compiled.append((prog.name, tuple(options), tuple(prog.names)))

    def getProgramLog(self, prog):
        return "kern.cu(1): error: something"

    def getCUBIN(self, prog):
        return b"\x7fELF"

    def getLoweredName(self, prog, name):
        return "" if name == self.drop else name

    def destroyProgram(self, prog):
        self.open -= 1


@pytest.fixture
def fake_nvrtc(monkeypatch):
    """Install a FakeNVRTC as cupy_backends.cuda.libs.nvrtc; returns it (set .broken/.drop before use)."""
    fake = FakeNVRTC()
    for name, module in (("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.libs", types.ModuleType("cupy_backends.cuda.libs"))):
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["cupy_backends.cuda.libs"].nvrtc = fake
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", fake)
    return fake


def test_every_kernel_the_python_side_launches_is_compiled():
    units = compile_kernels.compile_units()
    launched = set(re.findall(r'_kernel\("(\w+)"', open(cuda_kernels.__file__).read()))
    assert len(launched) == 7
    for ctype in ("float", "double"):
        rows = [u for u in units if u[0] == f"cuda_kernels ({ctype})"]
        assert len(rows) == 1 and set(rows[0][3]) == launched
        assert rows[0][1].startswith(f"typedef {ctype} real;")
        adamw = [u for u in units if u[0] == f"adamw_multi ({ctype})"]
        assert len(adamw) == 1 and adamw[0][3] == ("adamw_multi",)
        assert "--fmad=false" in adamw[0][2]  # bit-identical to adamw_update needs separate roundings
    assert ("counter_rng", counter_rng.SOURCE, (), counter_rng.KERNELS) in units


def test_compiles_each_source_for_each_architecture(fake_nvrtc, capsys):
    assert compile_kernels.main([]) == 0
    units = compile_kernels.compile_units()
    assert len(fake_nvrtc.compiled) == len(units) * len(compile_kernels.ARCHS)
    for label, _, options, names in units:
        for arch in compile_kernels.ARCHS:
            assert (f"{label}.cu", (f"-arch={arch}", *options), tuple(names)) in fake_nvrtc.compiled
    assert fake_nvrtc.open == 0  # every program destroyed
    assert re.search(r"^compile: PASS, 5 sources x 2 architectures", capsys.readouterr().out, re.M)


def test_a_compile_error_fails_the_step_with_nvrtc_s_log(fake_nvrtc, capsys):
    fake_nvrtc.broken = "adamw_multi("
    assert compile_kernels.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL: adamw_multi (float) for sm_90 does not compile" in out and "error: something" in out
    assert re.search(r"^compile: FAIL, .* 4 failed$", out, re.M)  # float and double, two archs each
    assert fake_nvrtc.open == 0


def test_a_kernel_name_missing_from_the_source_fails(fake_nvrtc, capsys):
    fake_nvrtc.drop = "causal_softmax_backward"
    assert compile_kernels.main([]) == 1
    assert "no extern \"C\" kernel named causal_softmax_backward" in capsys.readouterr().out


def test_without_nvrtc_one_sentence_and_exit_2(monkeypatch, capsys):
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs", "cupy_backends.cuda.libs.nvrtc"):
        monkeypatch.setitem(sys.modules, name, None)  # the import fails, as with no CuPy installed
    assert compile_kernels.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: NVRTC cannot be loaded") and err.count("\n") == 1


def test_launch_without_a_gpu_says_why(monkeypatch, capsys):
    from nanograd import backend
    monkeypatch.setattr(backend, "cupy_unavailable_reason", lambda: "CuPy is installed but no CUDA device is visible")
    assert compile_kernels.main(["--launch"]) == 2
    assert capsys.readouterr().err == ("error: --backend cupy cannot run: CuPy is installed but no CUDA device "
                                      "is visible.\n")
