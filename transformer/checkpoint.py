"""A pickle-free, self-describing single-file checkpoint format (spec: docs/checkpoint.md).

    magic (8) | version u32 LE (4) | header length u64 LE (8) | JSON header | tensor bytes | sha256 (32)

The header is {"meta": {...}, "tensors": {name: {"dtype", "shape", "offset", "nbytes"}}},
offsets counted from the start of the tensor bytes. Loading checks the magic, the
checksum, the version and every header entry before it builds a single array.
"""

import hashlib
import itertools
import json
import math
import os
import struct

import numpy as np

from .errors import CheckpointError
from .outputs import replacing
from .validate import check_memory, read_file, short, size_text

MAGIC = b"\x89NGCKPT\n"  # non-ASCII first byte: never text; "\n" catches newline mangling
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64")
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length: 20 bytes
_DIGEST = 32  # sha256 of everything before it
MAX_NDIM = 32  # NumPy allows 64; no tensor of a model has more than a few
JSON_BYTES_PER_BYTE = 40  # Python objects parsed from one byte of JSON, at worst ("{}," is a 64-byte dict)
MAX_DIM = 2**48  # one dimension's length: an empty tensor may claim any, NumPy refuses past 2**63


def _tensor_bytes(array):
    """Little-endian, C-order bytes of one array, as a uint8 view of the array itself when it
    already is one (on x86 and ARM it is): no copy of a 32 MB tensor."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)


def _header(tensors, meta):
    """The JSON header bytes, with each tensor's place in the data section."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    entries, offset = {}, 0
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} is a {type(array).__name__}; convert it to a host "
                            "numpy array first")
        if array.dtype.name not in DTYPES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {array.dtype}")
        entries[name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                         "offset": offset, "nbytes": array.nbytes}
        offset += array.nbytes
    return json.dumps({"meta": meta, "tensors": entries}, ensure_ascii=False).encode("utf-8")


def _fsync_dir(folder):
    """Make a rename in `folder` durable; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, tensors, meta):
    """Write host numpy `tensors` and JSON-able `meta` to `path` atomically (temp file + os.replace).

    On any failure the temp file is removed and an existing checkpoint at `path` is untouched.
    """
    path = os.fspath(path)
    header = _header(tensors, meta)  # validates everything before a file is made
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        digest = hashlib.sha256()
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header))
        for chunk in itertools.chain([prefix, header], map(_tensor_bytes, tensors.values())):
            digest.update(chunk)
            f.write(chunk)
        f.write(digest.digest())
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _read(path):
    """The whole file's bytes, or CheckpointError if it cannot be read."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or train a model first")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; pass the checkpoint file inside it")
    try:
        return read_file(path, "checkpoint", CheckpointError)  # a regular file, held twice at most
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror}); check its permissions") from e


def _check_container(path, blob):
    """Check magic, length, checksum and version; return the version."""
    if not blob.startswith(MAGIC):
        if blob.startswith(b"PK\x03\x04") or (len(blob) > 1 and blob[0] == 0x80 and 2 <= blob[1] <= 5):
            raise CheckpointError(f"{path} looks like a PyTorch/pickle file, not a checkpoint of this "
                                  "project; convert it with `python -m transformer.convert`")
        raise CheckpointError(f"{path} is not a checkpoint of this project (wrong magic bytes); "
                              "pass a checkpoint written by train.py")
    if len(blob) < _PREFIX.size + _DIGEST:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(blob)} bytes); save it again")
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (checksum mismatch); "
                              "use another copy or save it again")
    _, version, _ = _PREFIX.unpack_from(blob)
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {version} but this code reads "
                              f"only version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}; "
                              "update the code or re-save the checkpoint")
    return version


def _is_count(value):
    """True for a non-negative int (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(path, blob):
    """Decode the JSON header; return (meta, entries, data section start, data length)."""
    _, _, header_len = _PREFIX.unpack_from(blob)
    data_start = _PREFIX.size + header_len
    if data_start > len(blob) - _DIGEST:
        raise CheckpointError(f"checkpoint {path} has a header length past the end of the file; "
                              "the file is damaged, save it again")
    bad = f"checkpoint {path} has a malformed header; the file is damaged, save it again"
    check_memory(header_len * JSON_BYTES_PER_BYTE, f"the header of checkpoint {path} ({size_text(header_len)}) needs",
                 "the file was edited or damaged", CheckpointError)
    try:
        header = json.loads(blob[_PREFIX.size:data_start].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(bad) from e
    if (not isinstance(header, dict) or not isinstance(header.get("meta"), dict)
            or not isinstance(header.get("tensors"), dict)):
        raise CheckpointError(bad)
    return header["meta"], header["tensors"], data_start, len(blob) - _DIGEST - data_start


def _check_entry(path, name, entry, data_len):
    """CheckpointError unless one tensor entry is well-formed and inside the data section."""
    where = f"tensor {short(name)} in checkpoint {path}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "offset", "nbytes"} <= entry.keys():
        raise CheckpointError(f"{where} has a malformed entry; the file is damaged, save it again")
    if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {repr(entry['dtype'])[:40]}; "
                              f"supported are {', '.join(DTYPES)}")
    shape, offset, nbytes = entry["shape"], entry["offset"], entry["nbytes"]
    if not (isinstance(shape, list) and all(map(_is_count, shape))
            and _is_count(offset) and _is_count(nbytes)):
        raise CheckpointError(f"{where} has a malformed shape, offset or size; the file is damaged")
    if len(shape) > MAX_NDIM or any(n >= MAX_DIM for n in shape):
        raise CheckpointError(f"{where} has a shape of {len(shape)} dimensions up to {max(shape, default=0)} "
                              f"long, beyond {MAX_NDIM} dimensions of under 2**48; the file is damaged")
    if offset + nbytes > data_len:
        raise CheckpointError(f"{where} lies outside the file's data section; the file is damaged")
    if math.prod(shape) * np.dtype(entry["dtype"]).itemsize != nbytes:
        raise CheckpointError(f"{where} has shape {shape} that does not match its {nbytes} bytes; "
                              "the file is damaged")


def load_checkpoint(path):
    """Read `path` into ({name: owned writable numpy array}, meta); CheckpointError if it is not valid."""
    path = os.fspath(path)
    blob = _read(path)
    _check_container(path, blob)
    meta, entries, data_start, data_len = _parse_header(path, blob)
    for name, entry in entries.items():
        _check_entry(path, name, entry, data_len)
    spans = sorted((entry["offset"], entry["offset"] + entry["nbytes"]) for entry in entries.values()
                   if entry["nbytes"])
    if any(start < end for (_, end), (start, _) in zip(spans, spans[1:])):  # shared bytes: each a copy
        raise CheckpointError(f"checkpoint {path}'s tensors overlap in its data section (the writer packs "
                              "them apart); the file is damaged")
    tensors = {}
    for name, entry in entries.items():
        dtype = np.dtype(entry["dtype"])
        start = data_start + entry["offset"]
        flat = np.frombuffer(blob, dtype=dtype.newbyteorder("<"), count=entry["nbytes"] // dtype.itemsize,
                             offset=start)
        tensors[name] = flat.reshape(entry["shape"]).astype(dtype, copy=True)  # owned, writable
    return tensors, meta
