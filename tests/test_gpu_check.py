"""Tests for benchmarks/gpu_check.sh: it fails when CuPy cannot run, and fits its time.

The real run needs a GPU; here the script runs on a machine without one, where
every GPU phase must fail (NANOGRAD_REQUIRE_CUPY=1, the default) or, in the dry
run, read "no CuPy".
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanograd.backend import cupy_unavailable_reason

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PHASES = ["env", "launch", "kernels", "cupy-tests", "parity", "train", "resume", "inference", "bench"]


def phases_and_caps():
    """[(phase, cap seconds)] in the order the script runs them."""
    return [(name, int(cap)) for name, cap in re.findall(r"^run_phase ([\w-]+) (\d+) ", SCRIPT.read_text(), re.M)]


def test_phases_run_in_order_and_their_caps_fit_300_s():
    text = SCRIPT.read_text()
    assert [name for name, _ in phases_and_caps()] == PHASES
    assert sum(cap for _, cap in phases_and_caps()) < 300
    assert int(re.search(r"TOTAL_S=\$\{GPU_CHECK_SECONDS:-(\d+)\}", text).group(1)) < 300
    for setting in ("export NANOGRAD_REQUIRE_CUPY=$REQUIRE", "OMP_NUM_THREADS=4", "OPENBLAS_NUM_THREADS=4"):
        assert setting in text
    assert not re.search(r"pytest.* -n ", text)  # no pytest-xdist workers fighting over the cores
    assert text.rstrip().endswith('exit "$FAILED"')


def run_script(tmp_path, phases, require):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PHASES": phases, "GPU_CHECK_REQUIRE_CUPY": require,
           "PYTHON": sys.executable}
    env.pop("NANOGRAD_REQUIRE_CUPY", None)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    rows = re.findall(r"^\| ([\w-]+) \| ([^|]+) \|", result.stdout, re.M)
    return result, {name: status.strip() for name, status in rows if name in PHASES}


needs_no_gpu = pytest.mark.skipif(cupy_unavailable_reason() is None,
                                   reason="CuPy runs on this machine: the GPU check itself is the test")


@needs_no_gpu
def test_without_a_gpu_the_check_fails_loudly(tmp_path):
    """The old script ended with rm and so exited 0 whatever happened; a skipped GPU test read 'ok'."""
    result, rows = run_script(tmp_path, "env launch kernels parity", require="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert rows == {"env": "FAILED (exit 2)", "launch": "FAILED (exit 2)", "kernels": "FAILED (exit 1)",
                    "parity": "FAILED (exit 2)"}
    assert result.stdout.count("| phase | status | seconds | result |") == 1  # one summary table
    assert "NANOGRAD_REQUIRE_CUPY=1 but CuPy cannot run" in (tmp_path / "kernels.log").read_text()
    assert re.search(r"^total \d+ s; FAILED$", result.stdout, re.M)
    assert (tmp_path / "results.md").exists()


@needs_no_gpu
def test_the_dry_run_passes_where_only_the_gpu_is_missing(tmp_path):
    result, rows = run_script(tmp_path, "kernels parity", require="0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows == {"kernels": "no CuPy (dry run)", "parity": "no CuPy (dry run)"}
    assert re.search(r"^total \d+ s; all phases passed$", result.stdout, re.M)


def test_every_gpu_test_is_in_a_phase():
    """The kernels phase runs tests/test_cuda_kernels.py and the cupy-tests phase selects `-k cupy`:
    a test elsewhere that takes the cp fixture must say cupy in its name, or no phase would run it."""
    text = SCRIPT.read_text()
    assert "tests/test_cuda_kernels.py" in text and re.search(r"\"\$\{PYTEST\[@\]\}\" tests -k cupy", text)
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == "test_cuda_kernels.py":
            continue
        for name in re.findall(r"^def (test_\w+)\([^)]*\bcp\b", path.read_text(), re.M):
            assert "cupy" in name, f"{path.name}::{name} takes cp but -k cupy does not select it"
