"""transformer/legacy_checkpoint.py: files of the first format still load, through load_checkpoint
and load_state, and every bad one is refused in one line."""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nanograd import AdamW
from safetensors.numpy import load_file
from transformer import Model, legacy_checkpoint as legacy
from transformer.checkpoint import load_checkpoint
from transformer.convert import main as convert_main
from transformer.state import build_model, load_state, restore_optimizer
from transformer.errors import CheckpointError, UserError

from test_checkpoint import sample_tensors  # several dtypes and shapes, 0-d and empty among them

H = dict(d_model=16, num_blocks=1, num_heads=2, context_length=8, dropout=0.0, max_token_value=50)
META = {"step": 7, "config": {"d_model": 16, "name": "tiny"}, "loss": 2.5, "note": "变换器"}


def assemble(header, data=b"", version=legacy.VERSION):
    """A file with a correct checksum around any header (dict or raw bytes) and data."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    body = legacy.MAGIC + struct.pack("<IQ", version, len(header)) + header + data
    return body + hashlib.sha256(body).digest()


def first_format(tensors, meta):
    """The bytes the first format's writer made of tensors and meta (docs/checkpoint.md)."""
    entries, data = {}, b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entries[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "offset": len(data),
                         "nbytes": len(raw)}
        data += raw
    return assemble({"meta": meta, "tensors": entries}, data)


@pytest.fixture
def saved(tmp_path):
    """Path and bytes of a valid checkpoint of the first format."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(first_format(sample_tensors(), META))
    return path, path.read_bytes()


# ---- a model checkpoint written by the first format's own code ----------------------------

FIRST = Path(__file__).parent / "data" / "first_format.ckpt"  # written by commit e670208's save_state


def first_run():
    """The model and optimizer that tests/data/first_format.ckpt holds, made again: one step."""
    model = Model(H, seed=1)
    opt = AdamW(model.params)
    x = np.random.default_rng(0).integers(0, 50, (2, 8))  # (B, T)
    model(x, x)
    opt.step(model.backward())
    return model, opt


def test_a_first_format_model_checkpoint_loads_and_resumes():
    model, opt = first_run()
    tensors, meta = load_state(FIRST)
    assert meta["step"] == 1 and meta["run"]["seed"] == 1
    np.testing.assert_array_equal(tensors["vocab"], np.arange(50) * 3)
    again = build_model(tensors, meta)
    restored = AdamW(again.params)
    restore_optimizer(restored, tensors, meta, FIRST)
    assert restored.t == 1
    for name in model.params:
        np.testing.assert_array_equal(again.params[name], model.params[name])
        np.testing.assert_array_equal(restored.m[name], opt.m[name])
        np.testing.assert_array_equal(restored.v[name], opt.v[name])


def test_convert_writes_it_in_todays_format(tmp_path):
    """python -m transformer.convert old.ckpt new.ckpt: everything kept, now a safetensors file."""
    assert convert_main([str(FIRST), str(tmp_path / "new.ckpt")]) == 0
    old_tensors, old_meta = load_state(FIRST)
    new_tensors, new_meta = load_state(tmp_path / "new.ckpt")
    assert new_meta == {**old_meta, "tokenizer": "cl100k_base"}
    assert sorted(old_tensors) == sorted(new_tensors)
    for name in old_tensors:
        np.testing.assert_array_equal(old_tensors[name], new_tensors[name])
    assert "adamw.exp_avg.model_out_linear_layer.bias" in load_file(tmp_path / "new.ckpt")


@pytest.mark.parametrize("old, new", [("params/ln.weight", "ln.weight"), ("adamw/m/ln.weight", "adamw.exp_avg.ln.weight"),
                                      ("adamw/v/ln.weight", "adamw.exp_avg_sq.ln.weight"), ("other", "other")])
def test_current_names(old, new):
    tensors, meta = legacy.current_names({old: np.ones(2), "vocab": np.arange(3)}, {"step": 1})
    assert set(tensors) == {new} and meta == {"step": 1, "vocab": [0, 1, 2]}


# ---- the container ------------------------------------------------------------------------

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


# ---- errors ---------------------------------------------------------------------------

def expect_error(path, match):
    """load_checkpoint(path) must raise CheckpointError naming the path and matching `match`."""
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and isinstance(info.value, UserError)
    return info.value


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
    path.write_bytes(assemble({"meta": {}, "tensors": {}}, version=99))
    expect_error(path, "format version 99.*only version\\(s\\) 1, 2")


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
    body = legacy.MAGIC + struct.pack("<IQ", 1, 2**40) + b"{}"
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
    dtype = draw(st.sampled_from(legacy.DTYPES))
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
