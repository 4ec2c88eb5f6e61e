"""Tests for nanograd/backend.py: choosing a backend, and the helpers that hide NumPy/CuPy differences."""
import re
from types import SimpleNamespace

import numpy as np
import pytest

from nanograd import backend
from nanograd.backend import (BackendError, get_array_module, get_backend, make_rng,
                              scatter_add, synchronize, to_host)


def assert_one_sentence(message):
    """One line, ending in a full stop, with no sentence break inside."""
    assert message and "\n" not in message
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message[:-1]), message


def test_numpy_backend_is_numpy():
    assert get_backend("numpy") is np


def test_unknown_backend_raises_naming_it():
    with pytest.raises(BackendError) as e:
        get_backend("jax")
    assert "'jax'" in str(e.value)
    assert_one_sentence(str(e.value))


def test_cupy_unavailable_raises_the_reason_in_one_sentence(monkeypatch):
    reason = "CuPy is not installed or failed to import (ImportError: no cupy here)"
    monkeypatch.setattr(backend, "cupy_unavailable_reason", lambda: reason)
    with pytest.raises(BackendError) as e:
        get_backend("cupy")
    message = str(e.value)
    assert reason in message
    assert "cupy" in message.lower()
    assert_one_sentence(message)


def test_real_reason_when_cupy_is_missing():
    reason = backend.cupy_unavailable_reason()
    if reason is None:
        pytest.skip("CuPy runs on this machine")
    with pytest.raises(BackendError) as e:
        get_backend("cupy")
    assert reason in str(e.value)
    assert_one_sentence(str(e.value))


def _fake_cupy(count=1, count_error=None, kernel_error=None):
    """A stand-in for the cupy module with just what cupy_unavailable_reason touches."""
    def get_device_count():
        if count_error is not None:
            raise count_error
        return count

    def zeros(n):
        if kernel_error is not None:
            raise kernel_error
        return np.zeros(n)
    return SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=get_device_count)),
                           zeros=zeros)


@pytest.mark.parametrize("fake, words", [
    (None, "not installed"),
    (_fake_cupy(count_error=RuntimeError("cudaErrorInsufficientDriver")), "driver"),
    (_fake_cupy(count=0), "no CUDA device"),
    (_fake_cupy(kernel_error=RuntimeError("no kernel image")), "could not run a kernel"),
])
def test_every_unavailable_reason_is_one_sentence(monkeypatch, fake, words):
    monkeypatch.setattr(backend, "cupy", fake)
    monkeypatch.setattr(backend, "_cupy_import_error", "ModuleNotFoundError: No module named 'cupy'")
    reason = backend.cupy_unavailable_reason()
    assert words in reason
    with pytest.raises(BackendError) as e:
        get_backend("cupy")
    assert_one_sentence(str(e.value))


def test_working_fake_cupy_has_no_reason(monkeypatch):
    monkeypatch.setattr(backend, "cupy", _fake_cupy())
    assert backend.cupy_unavailable_reason() is None


def test_get_array_module(xp):
    assert get_array_module(xp.zeros(3)) is xp
    assert get_array_module(np.zeros(3)) is np


def test_scatter_add_accumulates_repeats(xp):
    out = xp.zeros((4, 2))  # (V, C)
    idx = xp.asarray([1, 3, 1, 1])
    values = xp.asarray([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [1000.0, 2000.0]])
    scatter_add(out, idx, values)
    np.testing.assert_array_equal(to_host(out), [[0, 0], [1101, 2202], [0, 0], [10, 20]])


def test_plain_fancy_index_add_drops_repeats():
    """Why scatter_add exists: `out[idx] += values` keeps one of the repeated rows."""
    out = np.zeros(3)
    out[np.array([1, 1])] += np.array([1.0, 2.0])
    assert out[1] != 3.0


def test_scatter_add_keeps_existing_values_and_dtype(xp):
    out = xp.ones(3, dtype=xp.float32)
    scatter_add(out, xp.asarray([2, 2]), xp.asarray([0.5, 0.25], dtype=xp.float32))
    assert out.dtype == xp.float32
    np.testing.assert_array_equal(to_host(out), [1.0, 1.0, 1.75])


def test_to_host_returns_numpy(xp):
    a = xp.arange(6.0).reshape(2, 3)
    h = to_host(a)
    assert isinstance(h, np.ndarray)
    np.testing.assert_array_equal(h, np.arange(6.0).reshape(2, 3))
    assert to_host([1, 2]).tolist() == [1, 2]


def test_synchronize_returns(xp):
    synchronize(xp)  # a no-op on NumPy; waits for the stream on CuPy


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_make_rng_is_deterministic(xp, dtype):
    dtype = np.dtype(dtype)  # CuPy's Generator.random takes a dtype, not its name
    a = to_host(make_rng(xp, 7).random((3, 4), dtype=dtype))
    b = to_host(make_rng(xp, 7).random((3, 4), dtype=dtype))
    c = to_host(make_rng(xp, 8).random((3, 4), dtype=dtype))
    assert a.dtype == dtype
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ((a >= 0) & (a < 1)).all()


def test_make_rng_mixes_several_ints(xp):
    """(seed, stream, step) seeds one stream each, the same every time."""
    a = to_host(make_rng(xp, 1, 2, 3).random(8))
    np.testing.assert_array_equal(a, to_host(make_rng(xp, 1, 2, 3).random(8)))
    for other in ((1, 2, 4), (1, 3, 3), (2, 2, 3)):
        assert not np.array_equal(a, to_host(make_rng(xp, *other).random(8))), other


def test_cupy_extras_need_a_release_built_for_numpy_2():
    """The numpy>=1.24 this project allows includes NumPy 2; CuPy supports NumPy 2 from 14.0 on
    (13.x imports under it but is not supported there), so the extras must not let pip pick 13;
    [ctk] brings the CUDA libraries as wheels, so a machine needs only the driver."""
    import tomllib
    from pathlib import Path
    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert extras["cuda12"] == ["cupy-cuda12x[ctk]>=14"]
    assert extras["cuda13"] == ["cupy-cuda13x[ctk]>=14"]
