"""Shared test setup: the backend fixture, the hypothesis profile, torch's settings.

torch is the oracle and a hard requirement of the tests: it is imported
directly, so a missing torch fails the run instead of skipping it.
"""
import os
import signal
import subprocess
import sys
import time

# Started as a background job (`pytest &` in a script), pytest has SIGINT ignored by the shell, and
# every train.py a test launches would inherit that and ignore the test's Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# CuPy reads CUPY_TF32 when it is imported; TF32 matmuls keep only 10 mantissa
# bits and would make float32 results disagree with the oracle.
os.environ["CUPY_TF32"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from nanograd.backend import cupy_unavailable_reason, get_backend, to_host  # noqa: E402
from nanograd.gradcheck import check_kernel  # noqa: E402

# Harmless on the CPU; on a GPU these keep torch's float32 matmuls and
# convolutions in true float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Deterministic (derandomized) and small: the kernel property tests run
# finite differences, two forwards per input element, so a few dozen
# examples per test keep the whole nanograd suite well under a minute on
# two cores.  HYPOTHESIS_PROFILE=thorough draws many more, seeded randomly.
settings.register_profile(
    "ci",
    deadline=None,  # GPU cases pay a one-off kernel compilation
    derandomize=True,
    database=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# benchmarks/gpu_check.sh's run of every CuPy test, which has about a minute: the
# same draws as "ci", fewer of them (tests/test_cuda_kernels.py keeps "ci").
settings.register_profile("gpu", parent=settings.get_profile("ci"), max_examples=5)
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def cupy_or_skip():
    """CuPy, or a skip that gives the one-sentence reason it cannot run here.

    With NANOGRAD_REQUIRE_CUPY=1 (benchmarks/gpu_check.sh sets it) the skip is
    a failure instead: on the GPU machine a test that could not reach CuPy has
    not passed, and must not let the run end green.
    """
    reason = cupy_unavailable_reason()
    if reason is None:
        return get_backend("cupy")
    if os.environ.get("NANOGRAD_REQUIRE_CUPY") == "1":
        pytest.fail(f"NANOGRAD_REQUIRE_CUPY=1 but CuPy cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cp():
    """CuPy; skipped with its reason without a device (a failure under NANOGRAD_REQUIRE_CUPY=1)."""
    return cupy_or_skip()


@pytest.fixture(scope="session", params=["numpy", "cupy"])
def xp(request):
    """The array module, NumPy and then CuPy; CuPy is skipped, with its reason, without a device
    (a failure under NANOGRAD_REQUIRE_CUPY=1)."""
    return cupy_or_skip() if request.param == "cupy" else get_backend(request.param)


def _relayout(xp, a, layout):
    """The same values as a in another memory layout, as a view.

    "C": contiguous.  "F": Fortran order, i.e. a transposed view of a
    contiguous array.  "strided": every other element of a twice-as-wide
    array along the last axis.  Writing into the view writes into its base,
    so finite differences that perturb it in place still work.
    """
    a = xp.asarray(a)
    if layout == "C":
        return xp.ascontiguousarray(a)
    if layout == "F":
        return xp.ascontiguousarray(a.T).T  # (...) reversed strides
    if layout == "strided":
        wide = xp.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)  # (..., 2*last)
        wide[..., ::2] = a
        return wide[..., ::2]  # (...) stride 2 along the last axis
    raise ValueError(layout)


@pytest.fixture(scope="session")
def relayout():
    """relayout(xp, a, "C" | "F" | "strided") -> a view with the same values."""
    return _relayout


def _assert_gradcheck(kernel, forward, backward, inputs, wrt, names, seed=0):
    """check_kernel's rows, asserting every one is ok; prints the table when one is not."""
    rows = check_kernel(kernel, forward, backward, inputs, wrt, names, seed=seed)
    assert len(rows) == len(wrt)
    bad = [r for r in rows if not r.ok]
    if bad:
        shapes = [getattr(a, "shape", None) for a in inputs]
        table = "\n".join(f"{r.input}: max_abs={r.max_abs:.3e} max_rel={r.max_rel:.3e} worst_index={r.worst_index} "
                          f"(analytic {r.analytic:.9e}, numerical {r.numerical:.9e}, err/tol {r.err_over_tol:.3g}) "
                          f"ok={r.ok}" for r in rows)
        pytest.fail(f"{kernel} backward disagrees with finite differences "
                    f"(input shapes {shapes}):\n{table}")
    return rows


@pytest.fixture(scope="session")
def gradcheck():
    """gradcheck(kernel, forward, backward, inputs, wrt, names, seed=0): assert every Row.ok."""
    return _assert_gradcheck


def _host(a):
    """A float64 NumPy copy (never a view: tests keep it to check that inputs are not written)."""
    return np.array(to_host(a), dtype=np.float64, copy=True)


@pytest.fixture(scope="session")
def host():
    """host(a) -> a float64 NumPy copy of a, for torch and for before/after checks."""
    return _host


class Measured(subprocess.CompletedProcess):
    """A finished command with its peak memory (max_rss_mb, from the kernel), wall time (seconds)
    and the time.monotonic() at which it exited (ended)."""


# Starts the command and reports its pid, then its peak memory.  A child of the test process
# itself would not do: a forked child's peak counts the parent's memory at the fork (Linux keeps
# the larger of the old and new address space's at exec), so it could never read below
# pytest's own few hundred MB.  This launcher is small when it forks.  Signals are passed on.
LAUNCHER = r"""
import os, signal, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.spawnv(os.P_NOWAIT, argv[0], argv)
with open(report, "w") as f:
    f.write(f"{pid}\n")
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, _: os.kill(pid, signum))
_, status, usage = os.wait4(pid, 0)
with open(report, "a") as f:
    f.write(f"{usage.ru_maxrss}\n")
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def _run_measured(args, timeout, cwd=None, env=None, on_start=None):
    """Run args (args[0] an executable path) to the end, killed after timeout seconds, stdout
    and stderr as text, with the peak resident memory of that process alone.  on_start(pid,
    stdout_path) may watch the running command (read /proc/<pid>, send it a signal)."""
    import tempfile
    import threading
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: os.path.join(folder, name) for name in ("out", "err", "report")}
        with open(paths["out"], "w") as out, open(paths["err"], "w") as err:
            start = time.perf_counter()
            launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, paths["report"], *map(str, args)],
                                        stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
            while not (os.path.exists(paths["report"]) and open(paths["report"]).read().endswith("\n")):
                if launcher.poll() is not None:
                    raise RuntimeError(f"the launcher failed: {open(paths['err']).read()}")
                time.sleep(0.01)
            pid = int(open(paths["report"]).read())

            def kill():
                for target in (pid, launcher.pid):
                    try:
                        os.kill(target, 9)
                    except ProcessLookupError:
                        pass
            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                if on_start is not None:
                    on_start(pid, paths["out"])
            finally:
                launcher.wait()
                ended = time.monotonic()
                timer.cancel()
            seconds = time.perf_counter() - start
        with open(paths["out"]) as out, open(paths["err"]) as err, open(paths["report"]) as report:
            result = Measured(args, launcher.returncode, out.read(), err.read())
            lines = report.read().split()
    result.max_rss_mb = int(lines[1]) / 1024 if len(lines) > 1 else float("nan")  # Linux counts kB
    result.seconds = seconds
    result.timed_out = seconds >= timeout
    result.ended = ended  # time.monotonic() when it exited
    return result


@pytest.fixture(scope="session")
def run_measured():
    """run_measured(args, timeout, cwd=None, env=None, on_start=None) -> CompletedProcess with
    .max_rss_mb (the command's own peak memory), .seconds, .timed_out and .ended."""
    return _run_measured
