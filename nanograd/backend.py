"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

Kernels never ask a global flag which one is active; they take the module
from their inputs, ``xp = get_array_module(x)``, so the same code runs on
both. The few places where NumPy and CuPy really differ hide behind the
named helpers below. The backend is chosen once, in train.py, by name.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import cupy
    import cupyx
    _cupy_import_error = None
except Exception as e:  # ImportError, or a broken CUDA install raising anything
    cupy, cupyx = None, None
    _cupy_import_error = f"{type(e).__name__}: {e}"


def cupy_unavailable_reason():
    """None when CuPy can run here, else one sentence saying why not."""
    if cupy is None:
        return ("CuPy is not installed or failed to import "
                f"({_cupy_import_error}); install it with "
                "pip install -e '.[cuda12]' or '.[cuda13]' to match your CUDA driver")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy is installed but the CUDA driver could not be reached ({e})"
    if count == 0:
        return "CuPy is installed but no CUDA device is visible"
    try:
        cupy.zeros(1).sum().item()  # compiles and runs one tiny kernel
    except Exception as e:
        return f"CuPy could not run a kernel on CUDA device 0 ({e})"
    return None


class BackendError(Exception):
    """The requested backend cannot run on this machine."""


def get_backend(name):
    """The array module for 'numpy' or 'cupy'; BackendError says why not."""
    if name == "numpy":
        return np
    if name == "cupy":
        reason = cupy_unavailable_reason()
        if reason is not None:
            raise BackendError(f"--backend cupy cannot run: {reason}.")
        return cupy
    raise BackendError(f"unknown backend {name!r}; choose 'numpy' or 'cupy'.")


def get_array_module(x):
    """numpy or cupy, whichever x belongs to."""
    return cupy.get_array_module(x) if cupy is not None else np


# The fused CUDA kernels of nanograd/cuda_kernels.py stand in for the plain ones
# on CuPy arrays while this is True; NANOGRAD_FUSED=0 starts with it off.
use_fused_kernels = os.environ.get("NANOGRAD_FUSED", "1") != "0"


def fused_kernels(*arrays):
    """nanograd.cuda_kernels if the arrays are CuPy arrays of one dtype, float32
    or float64, and fused kernels are on; else None: run the plain xp code."""
    if not use_fused_kernels or cupy is None or not all(isinstance(a, cupy.ndarray) for a in arrays):
        return None
    if arrays[0].dtype not in (np.float32, np.float64) or any(a.dtype != arrays[0].dtype for a in arrays):
        return None
    from . import cuda_kernels
    return cuda_kernels


def scatter_add(out, idx, values):
    """out[idx] += values, accumulating repeated indices (plain `+=` drops them)."""
    if get_array_module(out) is np:
        np.add.at(out, idx, values)
    else:
        cupyx.scatter_add(out, idx, values)


def to_host(x):
    """A NumPy copy (or view) of x, wherever x lives."""
    return x.get() if cupy is not None and isinstance(x, cupy.ndarray) else np.asarray(x)


def synchronize(xp):
    """Wait for queued GPU work (for timing); a no-op on NumPy."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def make_rng(xp, *seed):
    """A random generator on xp's device, seeded by one or more ints.

    Several ints, e.g. (seed, stream, step), are mixed by NumPy's
    SeedSequence, so every (run, purpose, step) gets its own stream and a
    resumed run draws exactly what an uninterrupted one would have.  On CuPy
    it is a CounterRNG (nanograd/counter_rng.py), which, unlike a cuRAND
    generator, costs nothing to make: train.py makes one every micro-step.
    """
    if xp is np:
        return np.random.default_rng(list(seed))
    from .counter_rng import CounterRNG
    return CounterRNG(xp, int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]))


_pool = None


def cpu_threads():
    """How many CPU threads nanograd uses: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))  # Linux: honours taskset and container CPU sets
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parallel(tasks):
    """Run every (function, *args) in tasks on one thread per CPU core; return their results in order.

    NumPy lets go of the GIL inside each operation on a large array, so the
    threads really work at once.  Errors are re-raised, and the caller's
    np.errstate holds in the threads too (it is per thread).
    """
    return [future.result() for future in submit(tasks)]


def submit(tasks):
    """parallel() without the wait: the tasks' futures, at once (future.result() waits for one)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(cpu_threads(), thread_name_prefix="nanograd")
    errors = np.geterr()
    return [_pool.submit(_run, errors, *task) for task in tasks]


def _run(errors, function, *args):
    with np.errstate(**errors):
        return function(*args)


def split_range(n, parts, multiple=1):
    """Cut range(n) into at most `parts` consecutive (start, stop) pieces, each a multiple long."""
    size = -(-n // parts)  # ceil
    size = -(-size // multiple) * multiple
    return [(start, min(start + size, n)) for start in range(0, n, size)]
