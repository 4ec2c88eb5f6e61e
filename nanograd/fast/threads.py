"""The CPU thread pool of the fast path: the fused output layer and the blocked AdamW split their work over it.

NumPy lets go of the GIL inside each operation on a large array, so threads
running such operations really work at once, one per core.  The reference
path (nanograd/*.py) never uses threads.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_pool = None


def cpu_threads():
    """How many CPU threads the fast path uses: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))  # Linux: honours taskset and container CPU sets
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parallel(tasks):
    """Run every (function, *args) in tasks on one thread per CPU core; return their results in order.

    A drop-in for [function(*args) for function, *args in tasks]: errors are
    re-raised, and the caller's np.errstate holds in the threads too (it is per thread).
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
    size = max(1, -(-n // parts))  # ceil, and at least 1 (n may be 0)
    size = -(-size // multiple) * multiple
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def use_own_threads():
    """BLAS on one thread from now on, in this process: the fast path splits its big kernels over
    the cores itself (parallel above), and a BLAS that also ran a thread per core would fight it
    for them (its idle threads spin).  The plain path never calls this, so it runs as any NumPy
    program does.  threadpoolctl finds whichever BLAS NumPy loaded (OpenBLAS, MKL, BLIS)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1, user_api="blas")
