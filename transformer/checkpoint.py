"""Checkpoints are safetensors files (spec: docs/checkpoint.md), with a checksum over the whole file.

    header length u64 LE (8) | JSON header: tensors and "__metadata__" | tensor bytes

safetensors (https://github.com/huggingface/safetensors) stores named little-endian tensors
and a string -> string metadata map; it never runs code, and its Rust parser refuses a header
whose entries overlap, leave gaps or run past the file.  On top of it this module keeps:

    metadata "format_version"  "2" (version 1 is the first, home-made format: legacy_checkpoint.py)
    metadata "sha256"          SHA-256 of the whole file with these 64 hex digits written as zeros
    metadata <key>             json.dumps(meta[key]) for each key of the caller's meta dict

Loading checks the file kind, the header's size, the checksum and the version before
safetensors parses it, and the dtypes before it builds a single array.
"""
import hashlib
import json
import os
import struct

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from . import legacy_checkpoint
from .errors import CheckpointError
from .outputs import replacing
from .validate import JSON_BYTES_PER_BYTE, MAX_NDIM, check_memory, open_regular, read_file, short, size_text

FORMAT_VERSION = 2
RESERVED = ("format_version", "sha256")  # metadata keys of the container, not of the caller's meta
_UNSET = "0" * 64  # the digest's place while the file is hashed
_DIGEST_KEY = b'"sha256":"'  # as serde_json writes the key; a value's own quotes are escaped
DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
          "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "F32": "float32",
          "F64": "float64"}  # safetensors' names of the dtypes NumPy has
CHUNK = 1 << 20
_UMASK = os.umask(0o022)  # read once, while importing: os.umask can only be read by setting it
os.umask(_UMASK)


def _little_endian(array):
    """C-order little-endian array with array's values: the array itself when it already is one
    (on x86 and ARM it is), so safetensors writes a 32 MB tensor without a copy."""
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # ascontiguousarray makes 0-d 1-d


def _metadata(meta):
    """The caller's meta as safetensors metadata: each value JSON, the container's keys added."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if any(key in meta for key in RESERVED):
        raise TypeError(f"meta may not use the keys {', '.join(RESERVED)}; the file format sets them")
    metadata = {key: json.dumps(value, ensure_ascii=False) for key, value in meta.items()}
    return {**metadata, "format_version": str(FORMAT_VERSION), "sha256": _UNSET}


def _digest_span(header):
    """(start, end) of the 64 digest digits in the header bytes, or None when there are none."""
    at = header.find(_DIGEST_KEY)
    start, end = at + len(_DIGEST_KEY), at + len(_DIGEST_KEY) + 64
    if at < 0 or header[end:end + 1] != b'"':
        return None
    return start, end


def _file_digest(f, header_len, span):
    """SHA-256 of the open file f from its start, the bytes at span (in the header) read as zeros."""
    digest = hashlib.sha256()
    f.seek(0)
    head = bytearray(f.read(8 + header_len))
    head[8 + span[0]:8 + span[1]] = _UNSET.encode()
    digest.update(head)
    while chunk := f.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


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

    safetensors writes the temp file; its checksum then goes into the place kept for it.
    On any failure the temp file is removed and an existing checkpoint at `path` is untouched.
    """
    path = os.fspath(path)
    for name, array in tensors.items():  # everything is checked before a file is made
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(array, np.ndarray) or array.dtype.name not in DTYPES.values():
            raise TypeError(f"tensor {name!r} is not a host numpy array of a dtype safetensors stores "
                            f"({type(array).__name__} {getattr(array, 'dtype', '')})")
    metadata = _metadata(meta)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with replacing(path) as tmp:
        save_file({name: _little_endian(array) for name, array in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors makes it 0600; a file we write has open()'s mode
        with open(tmp, "r+b") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            span = _digest_span(f.read(header_len))
            digest = _file_digest(f, header_len, span)
            f.seek(8 + span[0])
            f.write(digest.encode())
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(folder)


# ---- loading -------------------------------------------------------------------------------

def _open(path):
    """The checkpoint at path opened for reading, once it is known to be a regular file."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or train a model first")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; pass the checkpoint file inside it")
    try:
        return open_regular(path, "checkpoint", CheckpointError)  # a FIFO or a device: refused
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror}); check its permissions") from e


def _check_kind(path, f, size):
    """CheckpointError unless f starts like a safetensors file of a size that fits; returns
    its header length.  (A first-format file is read by legacy_checkpoint instead.)"""
    start = f.read(9)
    if start.startswith(b"PK\x03\x04") or (len(start) > 1 and start[0] == 0x80 and 2 <= start[1] <= 5):
        raise CheckpointError(f"{path} looks like a PyTorch/pickle file, not a checkpoint of this "
                              "project; convert it with `python -m transformer.convert`")
    if len(start) < 9 or start[8:9] != b"{":
        raise CheckpointError(f"{path} is not a checkpoint of this project (not a safetensors file); "
                              "pass a checkpoint written by train.py")
    (header_len,) = struct.unpack_from("<Q", start)
    if 8 + header_len > size:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (its header runs past the end "
                              "of the file); use another copy or save it again")
    check_memory(size + header_len * JSON_BYTES_PER_BYTE,
                 f"reading checkpoint {path} ({size_text(size)}, a header of {size_text(header_len)}) needs",
                 "the file was edited or damaged, or use a machine with more memory", CheckpointError)
    return header_len


def _check_digest(path, f, header_len):
    """CheckpointError unless the file's metadata holds a sha256 that matches the file."""
    f.seek(8)
    header = f.read(header_len)
    span = _digest_span(header)
    if span is None:
        raise CheckpointError(f"{path} is a safetensors file but not a checkpoint of this project "
                              "(it has no sha256 in its metadata); pass a checkpoint written by train.py")
    if _file_digest(f, header_len, span) != header[span[0]:span[1]].decode("latin-1"):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (checksum mismatch); "
                              "use another copy or save it again")


def _meta(path, metadata):
    """The caller's meta back from the metadata strings, after the format version is checked."""
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {path} has format version {short(version)} but this code reads "
                              f"only version(s) {legacy_checkpoint.VERSION}, {FORMAT_VERSION}; "
                              "update the code or re-save the checkpoint")
    meta = {}
    for key, value in metadata.items():
        if key not in RESERVED:
            try:
                meta[key] = json.loads(value)
            except (ValueError, RecursionError) as e:
                raise CheckpointError(f"checkpoint {path} has malformed metadata {short(key)} (not JSON); "
                                      "the file was edited or damaged") from e
    return meta


def load_checkpoint(path):
    """Read `path` into ({name: writable numpy array}, meta); CheckpointError if it is not valid.
    A file of the first format comes back under today's names (legacy_checkpoint.current_names)."""
    path = os.fspath(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(legacy_checkpoint.MAGIC)) == legacy_checkpoint.MAGIC:
            blob = read_file(path, "checkpoint", CheckpointError)  # a regular file, held twice at most
            return legacy_checkpoint.current_names(*legacy_checkpoint.read_container(path, blob))
        f.seek(0)
        header_len = _check_kind(path, f, size)
        _check_digest(path, f, header_len)
    try:
        with safe_open(path, framework="numpy") as st:
            meta = _meta(path, st.metadata() or {})
            for name in st.keys():
                entry = st.get_slice(name)
                dtype, ndim = entry.get_dtype(), len(entry.get_shape())
                if dtype not in DTYPES:
                    raise CheckpointError(f"tensor {short(name)} in checkpoint {path} has dtype {short(dtype)}, "
                                          "which NumPy has not; the file was edited or damaged")
                if ndim > MAX_NDIM:
                    raise CheckpointError(f"tensor {short(name)} in checkpoint {path} has a shape of {ndim} "
                                          f"dimensions, beyond {MAX_NDIM}; the file was edited or damaged")
            tensors = {name: st.get_tensor(name) for name in st.keys()}  # writable copies
    except SafetensorError as e:  # checksum right, parse wrong: written by something else
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({str(e)[:200]}); "
                              "the file was edited or damaged") from e
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror}); check its permissions") from e
    return tensors, meta
