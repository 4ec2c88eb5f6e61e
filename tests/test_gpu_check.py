"""Tests for benchmarks/gpu_check.sh: it fails when CuPy cannot run, fits its time, and writes
no more files than the device returns.

The real run needs a GPU; here the script runs on a machine without one, where
every GPU phase must fail (NANOGRAD_REQUIRE_CUPY=1, the default) or, in the dry
run, read "no CuPy".
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanograd.backend import cupy_unavailable_reason

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PHASES = ["env", "warmup", "launch", "kernels", "cupy-tests", "nccl", "step", "parity", "train", "resume",
          "inference", "bench"]
# The device returns at most 8 files from $OUT; these four are all the script writes there.
OUT_FILES = {"gpu_check.log", "results.md", "parity.md", "bench_gpu.md"}


def phases_and_caps():
    """[(phase, cap seconds)] in the order the script runs them."""
    return [(name, int(cap)) for name, cap in re.findall(r"^run_phase ([\w-]+) (\d+) ", SCRIPT.read_text(), re.M)]


def test_phases_run_in_order_within_six_minutes():
    """A cold machine: each cap leaves room for first-use compiles, the whole run stops at
    GPU_CHECK_SECONDS (6 minutes) whatever the caps add up to, and one device command (10 minutes)
    holds it with room for the start."""
    text = SCRIPT.read_text()
    assert [name for name, _ in phases_and_caps()] == PHASES
    total = int(re.search(r"TOTAL_S=\$\{GPU_CHECK_SECONDS:-(\d+)\}", text).group(1))
    assert total <= 360
    assert all(20 <= cap <= 90 for _, cap in phases_and_caps())
    assert "local limit=$(( cap < left ? cap : left ))" in text  # no phase runs past the deadline
    for setting in ("export NANOGRAD_REQUIRE_CUPY=$REQUIRE", "OMP_NUM_THREADS=4", "OPENBLAS_NUM_THREADS=4",
                    "export CUPY_CACHE_DIR=$WORK/", "CUPY_TF32=0"):
        assert setting in text
    pytest_flags = re.search(r"^PYTEST=\((.*)\)$", text, re.M).group(1).split()
    assert "--maxfail=5" in pytest_flags and "--durations=10" in pytest_flags and "-x" not in pytest_flags
    assert not re.search(r"pytest.* -n ", text)  # no pytest-xdist workers fighting over the cores
    assert text.rstrip().endswith('exit "$FAILED"')


def test_it_writes_only_four_files_to_the_output_folder():
    """The device sends back at most 8 files; nine phase logs and four more used to lose some."""
    text = SCRIPT.read_text()
    assert set(re.findall(r"\$OUT_DIR/([\w.]+)", text)) == OUT_FILES
    assert not re.search(r"\$OUT_DIR/\$", text)  # no file named after a phase


def run_script(tmp_path, phases, require, seconds="360"):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PHASES": phases, "GPU_CHECK_REQUIRE_CUPY": require,
           "PYTHON": sys.executable, "GPU_CHECK_SECONDS": seconds}
    env.pop("NANOGRAD_REQUIRE_CUPY", None)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    rows = re.findall(r"^\| ([\w-]+) \| ([^|]+) \|", result.stdout, re.M)
    return result, {name: status.strip() for name, status in rows if name in PHASES}


needs_no_gpu = pytest.mark.skipif(cupy_unavailable_reason() is None,
                                   reason="CuPy runs on this machine: the GPU check itself is the test")


def check_out(out):
    """At most four files, each far under the device's 16 MiB, all of them ones the script names."""
    files = list(out.iterdir())
    assert {f.name for f in files} <= OUT_FILES and len(files) <= 4
    assert all(f.is_file() and f.stat().st_size < 1 << 20 for f in files)


@needs_no_gpu
def test_without_a_gpu_every_phase_fails_within_a_minute(tmp_path):
    """The old script ended with rm and so exited 0 whatever happened; a skipped GPU test read 'ok'."""
    t0 = time.monotonic()
    result, rows = run_script(tmp_path, " ".join(PHASES), require="1")
    assert time.monotonic() - t0 < 90  # under a minute (19 s alone on 2 cores); room for a loaded machine
    assert result.returncode == 1, result.stdout + result.stderr
    assert list(rows) == PHASES and all(status.startswith("FAILED (exit ") for status in rows.values()), rows
    assert result.stdout.count("| phase | status | seconds | CuPy kernel cache after | result |") == 1  # one table
    log = (tmp_path / "gpu_check.log").read_text()
    assert "NANOGRAD_REQUIRE_CUPY=1 but CuPy cannot run" in log
    assert "CuPy package: none" in log and "mpiexec: " in log
    assert re.search(r"^=== kernels: FAILED \(exit 1\) in \d+s; CuPy kernel cache 0 files, 0 kB$", log, re.M)
    assert re.search(r"^total \d+ s; FAILED$", result.stdout, re.M)
    check_out(tmp_path)
    assert (tmp_path / "results.md").exists()


@needs_no_gpu
def test_the_dry_run_passes_where_only_the_gpu_is_missing(tmp_path):
    result, rows = run_script(tmp_path, " ".join(PHASES), require="0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows == {name: "no CuPy (dry run)" for name in PHASES}
    assert re.search(r"^total \d+ s; all phases passed$", result.stdout, re.M)
    check_out(tmp_path)
    # the nccl phase's stand-in tests ran; only its CuPy test skipped
    assert re.search(r"^\| nccl \| no CuPy \(dry run\) \| \d+ \| [^|]+ \| [1-9]\d* passed, 1 skipped ", result.stdout, re.M)


def test_a_phase_without_time_left_fails(tmp_path):
    result, rows = run_script(tmp_path, "env", require="0", seconds="3")
    assert result.returncode == 1 and rows == {"env": "FAILED (no time left)"}
    check_out(tmp_path)


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
