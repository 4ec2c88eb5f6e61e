"""Shared test setup: the backend fixture, the hypothesis profile, torch's settings.

torch is the oracle and a hard requirement of the tests: it is imported
directly, so a missing torch fails the run instead of skipping it.
"""
import os

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
