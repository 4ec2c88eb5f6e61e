"""transformer/checkpoint.py: safetensors files with a checksum; round trip, atomic save, and
refusal of every bad file in one line.  (The first format's reader: test_legacy_checkpoint.py.)"""

import hashlib
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from transformer import checkpoint
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.errors import CheckpointError, UserError

META = {"step": 7, "config": {"d_model": 16, "name": "tiny"}, "loss": 2.5, "note": "变换器", "none": None}


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


def split(blob):
    """(header dict, data bytes) of a safetensors file's bytes."""
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data):
    """A safetensors file's bytes from a header dict and data, its sha256 made right again."""
    header = json.loads(json.dumps(header))
    header.setdefault("__metadata__", {})["sha256"] = "0" * 64
    raw = json.dumps(header, separators=(",", ":")).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data
    return blob.replace(b"0" * 64, hashlib.sha256(blob).hexdigest().encode(), 1)


@pytest.fixture
def saved(tmp_path):
    """Path and bytes of a valid checkpoint."""
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, sample_tensors(), META)
    return path, path.read_bytes()


def test_round_trip(saved):
    tensors, meta = load_checkpoint(saved[0])
    expected = sample_tensors()
    assert sorted(tensors) == sorted(expected)
    assert meta == META
    for name, array in tensors.items():
        assert array.dtype == expected[name].dtype.newbyteorder("=")
        assert array.shape == expected[name].shape
        np.testing.assert_array_equal(array, expected[name])
        assert array.flags.writeable and array.flags.c_contiguous
    tensors["wte"] += 1  # writable copies


def test_safetensors_reads_it_and_the_layout_matches_the_spec(saved):
    """Any safetensors reader gets the tensors; the metadata holds each meta value as JSON, the
    format version, and the SHA-256 of the file with its own digits as zeros."""
    path, blob = saved
    loaded = load_file(path)
    for name, array in sample_tensors().items():
        np.testing.assert_array_equal(loaded[name], array)
    header, _ = split(blob)
    metadata = header["__metadata__"]
    assert {k: json.loads(v) for k, v in metadata.items() if k not in ("sha256", "format_version")} == META
    assert metadata["format_version"] == "2"
    assert metadata["sha256"] == hashlib.sha256(blob.replace(metadata["sha256"].encode(), b"0" * 64)).hexdigest()


def test_the_file_gets_the_mode_any_new_file_gets(saved):
    """safetensors creates its files 0600; a checkpoint is as readable as open() would make it."""
    path, _ = saved
    (path.parent / "plain").write_bytes(b"")
    assert path.stat().st_mode == (path.parent / "plain").stat().st_mode


def test_save_creates_parent_directory(tmp_path):
    path = tmp_path / "a" / "b" / "m.ckpt"
    save_checkpoint(str(path), {"x": np.ones(2)}, {})
    assert load_checkpoint(str(path))[1] == {}


@pytest.mark.parametrize("tensors, meta", [
    ({"x": [1.0, 2.0]}, {}),  # not a numpy array
    ({"x": np.array(["a"])}, {}),  # unsupported dtype
    ({"x": np.ones(2, np.complex64)}, {}),
    ({"x": np.ones(2)}, {"f": object()}),  # meta not JSON
    ({"x": np.ones(2)}, ["not a dict"]),
    ({"x": np.ones(2)}, {"sha256": "mine"}),  # a key of the file format
])
def test_save_rejects_bad_input_before_writing(tmp_path, tensors, meta):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.ckpt", tensors, meta)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("failure", ["write", "fsync", "replace", "interrupt"])
def test_failed_save_leaves_old_checkpoint(saved, monkeypatch, failure):
    path, before = saved

    def fail(*args, **kwargs):
        raise KeyboardInterrupt if failure == "interrupt" else OSError("simulated failure")
    if failure in ("write", "interrupt"):
        monkeypatch.setattr(checkpoint, "save_file", lambda tensors, tmp, metadata: (
            save_file(tensors, tmp, metadata), fail()))  # the temp file is there, then it fails
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
    assert "\n" not in str(info.value)
    return info.value


def test_missing_directory_and_fifo(tmp_path):
    expect_error(tmp_path / "nope.ckpt", "does not exist")
    expect_error(tmp_path, "is a directory")
    os.mkfifo(tmp_path / "pipe")
    expect_error(tmp_path / "pipe", "is a FIFO")


def test_unreadable(saved, monkeypatch):
    def deny(*args, **kwargs):  # chmod 000 does not stop root, so fake the refusal
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoint, "open_regular", deny)
    expect_error(saved[0], "cannot read.*permissions")


@pytest.mark.parametrize("contents, match", [
    (b"", "not a checkpoint of this project"),
    (b"hello world, this is text", "not a checkpoint of this project"),
    (b"PK\x03\x04" + bytes(100), "PyTorch/pickle.*transformer.convert"),
    (pickle.dumps({"w": [1.0]}, protocol=2), "PyTorch/pickle"),
    (struct.pack("<Q", 100) + b"{}", "truncated"),
])
def test_foreign_and_short_files(tmp_path, contents, match):
    path = tmp_path / "m.ckpt"
    path.write_bytes(contents)
    expect_error(path, match)


def test_a_safetensors_file_of_someone_else_is_not_ours(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors", metadata={"format": "pt"})
    expect_error(tmp_path / "m.safetensors", "a safetensors file but not a checkpoint of this project")


def test_truncated_and_flipped(saved):
    path, blob = saved
    path.write_bytes(blob[:-1])
    expect_error(path, "corrupted or truncated")
    # in the tensor bytes, and in the header inside a metadata value (safetensors writes the
    # metadata in a random order, so a fixed offset could land on the sha256 key itself)
    for at in (len(blob) - 5, blob.index(b"d_model")):
        flipped = bytearray(blob)
        flipped[at] ^= 0x10
        path.write_bytes(bytes(flipped))
        expect_error(path, "corrupted or truncated")


def test_unknown_version(saved):
    path, blob = saved
    header, data = split(blob)
    header["__metadata__"]["format_version"] = "99"
    path.write_bytes(join(header, data))
    expect_error(path, r"format version '99' .*only version\(s\) 1, 2")


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("entries, match", [
    ({"w": {**GOOD, "dtype": "BF16", "shape": [4]}}, "has dtype 'BF16', which NumPy has not"),
    ({"w": {**GOOD, "dtype": "object"}}, "not a valid safetensors file"),
    ({"w": {**GOOD, "shape": [-2]}}, "not a valid safetensors file"),
    ({"w": {**GOOD, "shape": [3]}}, "not a valid safetensors file"),
    ({"w": {**GOOD, "shape": [2**62, 2**62, 0]}}, "not a valid safetensors file"),
    ({"w": {**GOOD, "data_offsets": [4, 12]}}, "not a valid safetensors file"),
    ({"w": {**GOOD, "data_offsets": [0, 10**30]}}, "not a valid safetensors file"),
    ({"w": [1]}, "not a valid safetensors file"),
    ({"w": GOOD, "v": GOOD}, "not a valid safetensors file"),  # two entries over the same bytes
])
def test_bad_entries_with_valid_checksum(tmp_path, entries, match):
    """safetensors' own parser refuses what does not tile the data exactly; we word it."""
    path = tmp_path / "m.ckpt"
    path.write_bytes(join({"__metadata__": {"format_version": "2"}, **entries}, np.ones(2, "<f4").tobytes()))
    expect_error(path, match)


def test_overlapping_entries_cannot_multiply_the_file(tmp_path):
    """1000 entries over the same 8 bytes would be 1000 copies: a small file, a large allocation."""
    entries = {f"w{i}": GOOD for i in range(1000)}
    path = tmp_path / "m.ckpt"
    path.write_bytes(join({"__metadata__": {"format_version": "2"}, **entries}, np.ones(2, "<f4").tobytes()))
    expect_error(path, r"not a valid safetensors file")


def test_malformed_metadata_value(saved):
    path, blob = saved
    header, data = split(blob)
    header["__metadata__"]["step"] = "{not json"
    path.write_bytes(join(header, data))
    expect_error(path, r"malformed metadata 'step' \(not JSON\)")


def test_a_header_too_big_to_parse_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGRAD_MEMORY_LIMIT", str(40 * 1000 - 1))
    path = tmp_path / "m.ckpt"
    path.write_bytes(struct.pack("<Q", 1000) + b"{" + b"{}," * 333)  # 1000 bytes: 333 dicts, unparsed
    expect_error(path, r"reading checkpoint .* a header of 1\.0 kB\) needs about 41\.0 kB of memory")


def test_long_names_are_cut_in_the_message(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(join({"__metadata__": {"format_version": "2"}, "w" * 10**5: {**GOOD, "dtype": "BF16", "shape": [4]}},
                          np.ones(2, "<f4").tobytes()))
    assert len(str(expect_error(path, "which NumPy has not"))) < 500


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


@FUZZ
@given(blob=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, blob):
    (tmp_path / "f.ckpt").write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "f.ckpt")


@FUZZ
@given(data=st.data())
def test_fuzz_flips_and_truncations(saved, data):
    path, blob = saved
    mutated = bytearray(blob)
    for i in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True)):
        mutated[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(blob)))
    path.write_bytes(bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@st.composite
def entries(draw):
    """A valid tensor entry, then maybe some fields replaced by junk or nearby numbers."""
    dtype = draw(st.sampled_from(sorted(checkpoint.DTYPES) + ["BF16", "F8_E4M3"]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = int(np.prod(shape)) * (np.dtype(checkpoint.DTYPES[dtype]).itemsize if dtype in checkpoint.DTYPES else 2)
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}
    for field in draw(st.lists(st.sampled_from(sorted(entry)), max_size=2, unique=True)):
        entry[field] = draw(junk | st.integers(-2, 45) | st.lists(st.integers(-2, 45), max_size=3))
    if draw(st.booleans()) and draw(st.booleans()):
        del entry[draw(st.sampled_from(sorted(entry)))]
    return entry


@FUZZ
@given(entry=entries(), data_len=st.integers(0, 40))
def test_fuzz_headers_with_valid_checksum(tmp_path, entry, data_len):
    """Arbitrary entries behind a correct checksum load correctly or raise CheckpointError."""
    path = tmp_path / "f.ckpt"
    data = bytes(range(data_len))
    path.write_bytes(join({"__metadata__": {"format_version": "2"}, "w": entry}, data))
    try:
        tensors, _ = load_checkpoint(path)
    except CheckpointError:
        return
    w = tensors["w"]  # it loaded, so the entry described exactly the bytes of the file
    assert checkpoint.DTYPES[entry["dtype"]] == w.dtype.name and list(w.shape) == entry["shape"]
    assert w.tobytes() == data
