"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

Kernels never ask a global flag which one is active; they take the module
from their inputs, ``xp = get_array_module(x)``, so the same code runs on
both. The few places where NumPy and CuPy really differ hide behind the
named helpers below. The backend is chosen once, in train.py, by name.
"""
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
    it is a CounterRNG (nanograd/fast/counter_rng.py), which, unlike a cuRAND
    generator, costs nothing to make: train.py makes one every micro-step.
    """
    if xp is np:
        return np.random.default_rng(list(seed))
    from .fast.counter_rng import CounterRNG
    return CounterRNG(xp, int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]))
