"""The pickle-free checkpoint format: round trip, atomic save, and refusal of every bad file."""

import hashlib
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from transformer import checkpoint
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.errors import CheckpointError, UserError

META = {"step": 7, "config": {"d_model": 16, "name": "tiny"}, "loss": 2.5, "note": "变换器"}


def sample_tensors():
    """Several dtypes and shapes, including 0-d and empty."""
    rng = np.random.default_rng(0)
    return {
        "wte": rng.standard_normal((5, 3)).astype(np.float32),
        "w64": rng.standard_normal((2, 3, 4)),
        "steps": np.array(12345678901, dtype=np.int64),  # 0-d
        "ids": rng.integers(-100, 100, size=7).astype(np.int32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "mask": np.array([True, False, True]),
        "half": np.arange(4, dtype=np.float16),
        "strided": rng.standard_normal((4, 6))[:, ::2],  # not C-contiguous
        "big_endian": np.arange(3, dtype=">f8"),
    }


def assemble(header, data=b"", version=checkpoint.FORMAT_VERSION):
    """A file with a correct checksum around any header (dict or raw bytes) and data."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    body = checkpoint.MAGIC + struct.pack("<IQ", version, len(header)) + header + data
    return body + hashlib.sha256(body).digest()


@pytest.fixture
def saved(tmp_path):
    """Path and bytes of a valid checkpoint."""
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, sample_tensors(), META)
    return path, path.read_bytes()


def test_round_trip(saved):
    tensors, meta = load_checkpoint(saved[0])
    expected = sample_tensors()
    assert list(tensors) == list(expected)
    assert meta == META
    for name, array in tensors.items():
        assert array.dtype == expected[name].dtype.newbyteorder("=")
        assert array.shape == expected[name].shape
        np.testing.assert_array_equal(array, expected[name])
        assert array.flags.writeable and array.flags.owndata and array.flags.c_contiguous
    tensors["wte"] += 1  # writable, owned copies


def test_layout_matches_spec(saved):
    _, blob = saved
    assert blob[:8] == b"\x89NGCKPT\n"
    version, header_len = struct.unpack_from("<IQ", blob, 8)
    header = json.loads(blob[20:20 + header_len])
    assert version == 1 and header["meta"] == META
    entry = header["tensors"]["w64"]
    assert entry == {"dtype": "float64", "shape": [2, 3, 4], "offset": 60, "nbytes": 192}
    start = 20 + header_len + entry["offset"]
    np.testing.assert_array_equal(np.frombuffer(blob[start:start + 192], "<f8").reshape(2, 3, 4),
                                  sample_tensors()["w64"])
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()


def test_save_creates_parent_directory(tmp_path):
    path = tmp_path / "a" / "b" / "m.ckpt"
    save_checkpoint(str(path), {"x": np.ones(2)}, {})
    assert load_checkpoint(str(path))[1] == {}


@pytest.mark.parametrize("tensors, meta", [
    ({"x": [1.0, 2.0]}, {}),  # not a numpy array
    ({"x": np.array(["a"])}, {}),  # unsupported dtype
    ({"x": np.ones(2)}, {"f": object()}),  # meta not JSON
    ({"x": np.ones(2)}, ["not a dict"]),
])
def test_save_rejects_bad_input_before_writing(tmp_path, tensors, meta):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.ckpt", tensors, meta)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("failure", ["tensor bytes", "fsync", "replace", "interrupt"])
def test_failed_save_leaves_old_checkpoint(saved, monkeypatch, failure):
    path, before = saved
    calls = []

    def fail_on_second_tensor(array):
        calls.append(array)
        if len(calls) == 2:
            raise KeyboardInterrupt if failure == "interrupt" else OSError("disk full")
        return np.ascontiguousarray(array).tobytes()

    def fail(*args):
        raise OSError("simulated failure")
    if failure in ("tensor bytes", "interrupt"):
        monkeypatch.setattr(checkpoint, "_tensor_bytes", fail_on_second_tensor)
    else:
        monkeypatch.setattr(checkpoint.os, failure, fail)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_checkpoint(path, {"a": np.zeros(3), "b": np.ones(3)}, {"step": 99})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # temp file removed
    assert load_checkpoint(path)[1] == META


# ---- errors ---------------------------------------------------------------------------

def expect_error(path, match):
    """load_checkpoint(path) must raise CheckpointError naming the path and matching `match`."""
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and isinstance(info.value, UserError)
    return info.value


def test_missing_and_directory(tmp_path):
    expect_error(tmp_path / "nope.ckpt", "does not exist")
    expect_error(tmp_path, "is a directory")


def test_unreadable(saved, monkeypatch):
    def deny(*args, **kwargs):  # chmod 000 does not stop root, so fake the refusal
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoint, "read_file", deny)
    expect_error(saved[0], "cannot read.*permissions")


@pytest.mark.parametrize("contents, match", [
    (b"", "wrong magic"),
    (b"hello world, this is text", "wrong magic"),
    (b"PK\x03\x04" + bytes(100), "PyTorch/pickle.*transformer.convert"),
    (pickle.dumps({"w": [1.0]}, protocol=2), "PyTorch/pickle"),
    (checkpoint.MAGIC + b"\x01\x00", "truncated"),
])
def test_foreign_and_short_files(tmp_path, contents, match):
    path = tmp_path / "m.ckpt"
    path.write_bytes(contents)
    expect_error(path, match)


def test_truncated_and_flipped(saved):
    path, blob = saved
    path.write_bytes(blob[:-1])
    expect_error(path, "corrupted or truncated")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    expect_error(path, "checksum mismatch")


def test_unknown_version(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(assemble({"meta": {}, "tensors": {}}, version=2))
    expect_error(path, "format version 2.*only version\\(s\\) 1")


GOOD_ENTRY = {"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}


@pytest.mark.parametrize("header, match", [
    (b"{not json", "malformed header"),
    (b"\xff\xfe{}", "malformed header"),
    (b"[1, 2]", "malformed header"),
    ({"tensors": {}}, "malformed header"),
    ({"meta": {}, "tensors": []}, "malformed header"),
    ({"meta": {}, "tensors": {"w": [1]}}, "malformed entry"),
    ({"meta": {}, "tensors": {"w": {"dtype": "float32"}}}, "malformed entry"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "dtype": "object"}}}, "unsupported dtype 'object'"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "dtype": "<f4"}}}, "unsupported dtype"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "shape": [-2]}}}, "malformed shape"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "shape": 2}}}, "malformed shape"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "shape": [True, 2]}}}, "malformed shape"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "offset": -1}}}, "malformed shape"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "nbytes": 8.0}}}, "malformed shape"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "offset": 4}}}, "outside the file's data"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "nbytes": 10**30}}}, "outside the file's data"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "shape": [3]}}}, "does not match its 8 bytes"),
    ({"meta": {}, "tensors": {"w": {**GOOD_ENTRY, "shape": [10**12, 10**12, 0, 5]}}}, "does not match"),
])
def test_bad_header_with_valid_checksum(tmp_path, header, match):
    path = tmp_path / "m.ckpt"
    path.write_bytes(assemble(header, np.ones(2, "<f4").tobytes()))
    expect_error(path, match)


def test_overlapping_entries_cannot_multiply_the_file(tmp_path):
    """1000 entries over the same 8 bytes would be 1000 copies: a small file, a large allocation."""
    entries = {f"w{i}": GOOD_ENTRY for i in range(1000)}
    path = tmp_path / "m.ckpt"
    path.write_bytes(assemble({"meta": {}, "tensors": entries}, np.ones(2, "<f4").tobytes()))
    expect_error(path, r"tensors overlap in its data section")


def test_a_header_too_big_to_parse_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGRAD_MEMORY_LIMIT", str(40 * 1000 - 1))
    path = tmp_path / "m.ckpt"
    path.write_bytes(assemble(b"[" + b"{}," * 333 + b"{}]"))  # 1000 bytes: a thousand dicts
    expect_error(path, r"the header of checkpoint .* \(1\.0 kB\) needs about 40\.\d kB of memory")


def test_long_tensor_names_are_cut_in_the_message(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(assemble({"meta": {}, "tensors": {"w" * 10**6: {**GOOD_ENTRY, "dtype": "x"}}}))
    assert len(str(expect_error(path, "unsupported dtype"))) < 500


def test_header_length_past_end(tmp_path):
    path = tmp_path / "m.ckpt"
    body = checkpoint.MAGIC + struct.pack("<IQ", 1, 2**40) + b"{}"
    path.write_bytes(body + hashlib.sha256(body).digest())
    expect_error(path, "header length past the end")


def test_assemble_builds_loadable_files(tmp_path):
    """The helper the error tests rely on makes valid files when given a valid header."""
    path = tmp_path / "m.ckpt"
    path.write_bytes(assemble({"meta": {"a": 1}, "tensors": {"w": GOOD_ENTRY}},
                              np.array([1.5, 2.5], "<f4").tobytes()))
    tensors, meta = load_checkpoint(path)
    np.testing.assert_array_equal(tensors["w"], [1.5, 2.5])
    assert meta == {"a": 1}


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pickle", "torch zip"])
def test_malicious_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": Exploit(marker)}, protocol=2)
    path = tmp_path / "evil.ckpt"
    if container == "pickle":
        path.write_bytes(payload)
    else:  # laid out like torch.save's zip archive
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
    expect_error(path, "PyTorch/pickle")
    assert not marker.exists()


# ---- fuzz -----------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_fails_cleanly(path, blob):
    """Write blob to path; loading must raise CheckpointError and nothing else."""
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, blob):
    load_fails_cleanly(tmp_path / "f.ckpt", blob)


@FUZZ
@given(data=st.data())
def test_fuzz_flips_and_truncations(saved, data):
    path, blob = saved
    mutated = bytearray(blob)
    for i in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True)):
        mutated[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(blob)))
    load_fails_cleanly(path, bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated))


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@st.composite
def entries(draw):
    """A valid tensor entry, then maybe some fields replaced by junk or nearby numbers."""
    dtype = draw(st.sampled_from(checkpoint.DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    entry = {"dtype": dtype, "shape": shape, "offset": draw(st.integers(0, 40)),
             "nbytes": int(np.prod(shape)) * np.dtype(dtype).itemsize}
    for field in draw(st.lists(st.sampled_from(sorted(entry)), max_size=2, unique=True)):
        entry[field] = draw(junk | st.integers(-2, 45))
    if draw(st.booleans()) and draw(st.booleans()):
        del entry[draw(st.sampled_from(sorted(entry)))]
    return entry


@FUZZ
@given(entry=entries(), data_len=st.integers(0, 40))
def test_fuzz_headers_with_valid_checksum(tmp_path, entry, data_len):
    """Arbitrary entries behind a correct checksum load correctly or raise CheckpointError."""
    path = tmp_path / "f.ckpt"
    data = bytes(range(data_len))
    path.write_bytes(assemble({"meta": {}, "tensors": {"w": entry}}, data))
    try:
        tensors, _ = load_checkpoint(path)
    except CheckpointError:
        return
    w = tensors["w"]  # it loaded, so the entry described real bytes of the file
    assert w.dtype.name == entry["dtype"] and list(w.shape) == entry["shape"]
    assert w.tobytes() == data[entry["offset"]:entry["offset"] + entry["nbytes"]]
