"""What the GPU check runs on: versions of everything the CuPy path and the tests touch.

    python benchmarks/gpu_env.py      # gpu_check.sh's first phase

Prints the Python packages (with the CuPy wheel's own name: cupy-cuda12x or
cupy-cuda13x), torch's CUDA build, whether mpiexec exists, then the GPU, the
driver and the CUDA runtime, NVRTC and NCCL versions as CuPy sees them.  A
version that cannot be read is printed with the reason, never a traceback.
Exit status 0 when CuPy can run here, 2 when it cannot (the reason is printed).
"""
import importlib.metadata
import os
import platform
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGES = ("numpy", "torch", "pytest", "hypothesis", "tiktoken", "tqdm", "safetensors", "mpi4py")


def read(what, get):
    """'what: value', or 'what: unavailable (the error)' when get() raises."""
    try:
        return f"{what}: {get()}"
    except Exception as e:  # a missing library raises anything from ImportError to CUDARuntimeError
        return f"{what}: unavailable ({type(e).__name__}: {e})"


def cupy_packages():
    """The installed distributions that provide CuPy, e.g. 'cupy-cuda13x 14.2.0', or 'none'."""
    names = sorted({f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("cupy")})
    return ", ".join(names) or "none"


def host_lines():
    """Python, the packages, torch's CUDA, the CuPy wheel and mpiexec: nothing here needs a GPU."""
    lines = [f"python {platform.python_version()} ({sys.executable})"]
    lines += [read(name, lambda name=name: importlib.metadata.version(name)) for name in PACKAGES]
    lines.append(read("torch CUDA", lambda: __import__("torch").version.cuda))
    lines.append(f"CuPy package: {cupy_packages()}")
    lines.append(f"mpiexec: {shutil.which('mpiexec') or 'not found (NCCL is checked with one rank)'}")
    lines.append(f"CUPY_TF32={os.environ.get('CUPY_TF32')}, CUPY_CACHE_DIR={os.environ.get('CUPY_CACHE_DIR')}")
    return lines


def nccl_version():
    """NCCL's version as CuPy loaded it (e.g. 22703 for 2.27.3); CuPy's import of it never fails."""
    from cupy.cuda import nccl
    if not getattr(nccl, "available", True):
        raise ImportError("CuPy found no NCCL library")
    return nccl.get_version()


def gpu_lines(cupy):
    """The GPU, its memory and the CUDA libraries CuPy loaded."""
    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device()
    props = runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    free, total = runtime.memGetInfo()
    return [f"GPU: {name}, compute capability {device.compute_capability}, {props['multiProcessorCount']} SMs, "
            f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)",
            read("driver (CUDA version it supports)", runtime.driverGetVersion),
            read("CUDA runtime", runtime.runtimeGetVersion),
            read("NVRTC", lambda: "%d.%d" % cupy.cuda.nvrtc.getVersion()),
            read("NCCL", nccl_version),
            read("cupy", lambda: cupy.__version__)]


def main():
    for line in host_lines():
        print(line, flush=True)
    print(read("torch CUDA device", lambda: __import__("torch").cuda.get_device_name(0)), flush=True)
    import train  # noqa: F401  its top-level imports must all be on this machine
    from nanograd.backend import cupy_unavailable_reason
    reason = cupy_unavailable_reason()
    print(f"cupy_unavailable_reason: {reason}")
    if reason is not None:
        return 2
    import cupy
    for line in gpu_lines(cupy):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
