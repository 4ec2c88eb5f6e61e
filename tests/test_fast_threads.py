"""Tests for nanograd/fast/threads.py: the fast path's CPU thread pool."""
import numpy as np
import pytest

from nanograd.fast import threads


def test_cpu_threads_are_the_cores_this_process_may_use(monkeypatch):
    import os
    assert threads.cpu_threads() >= 1
    if hasattr(os, "sched_getaffinity"):
        assert threads.cpu_threads() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})  # e.g. taskset -c 0,3,5
        assert threads.cpu_threads() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads.cpu_threads() == 1


def test_parallel_returns_results_in_order_under_the_callers_errstate():
    """parallel() is a drop-in for running the tasks one after another: results in task
    order, and the caller's np.errstate (per thread in NumPy) holds in the pool's threads."""
    def overflow(scale):
        return np.float32(3e38) * np.float32(scale)  # inf for scale 10
    assert threads.parallel([(pow, 2, n) for n in range(6)]) == [1, 2, 4, 8, 16, 32]
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        threads.parallel([(overflow, 1), (overflow, 10)])
    with np.errstate(over="ignore"):
        assert threads.parallel([(overflow, 10)]) == [np.inf]


@pytest.mark.parametrize("n, parts, multiple", [(10, 3, 1), (10, 4, 4), (1, 2, 1), (0, 2, 1), (7, 1, 2)])
def test_split_range_covers_every_index_once(n, parts, multiple):
    pieces = threads.split_range(n, parts, multiple)
    assert len(pieces) <= parts
    covered = [i for start, stop in pieces for i in range(start, stop)]
    assert covered == list(range(n))
    assert all((stop - start) % multiple == 0 for start, stop in pieces[:-1])
