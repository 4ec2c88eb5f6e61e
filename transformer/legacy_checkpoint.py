"""Reading checkpoints of the first format (version 1), written before checkpoints were
safetensors files (docs/checkpoint.md, "The first format").  Nothing writes this format any more.

    magic (8) | version u32 LE (4) | header length u64 LE (8) | JSON header | tensor bytes | sha256 (32)

The header is {"meta": {...}, "tensors": {name: {"dtype", "shape", "offset", "nbytes"}}},
offsets counted from the start of the tensor bytes.  `read` checks the magic, the checksum,
the version and every header entry before it builds a single array, then renames what it
holds to today's names (`current_names`), so the rest of the code knows one layout only.
"""
import hashlib
import json
import math
import struct

import numpy as np

from .errors import CheckpointError
from .validate import JSON_BYTES_PER_BYTE, MAX_NDIM, check_memory, short, size_text

MAGIC = b"\x89NGCKPT\n"  # non-ASCII first byte: never text; "\n" catches newline mangling
VERSION = 1
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64")
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length: 20 bytes
_DIGEST = 32  # sha256 of everything before it
MAX_DIM = 2**48  # one dimension's length: an empty tensor may claim any, NumPy refuses past 2**63


def _check_container(path, blob):
    """Check length, checksum and version (the caller saw the magic)."""
    if len(blob) < _PREFIX.size + _DIGEST:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(blob)} bytes); save it again")
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (checksum mismatch); "
                              "use another copy or save it again")
    _, version, _ = _PREFIX.unpack_from(blob)
    if version != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version} but this code reads "
                              "only version(s) 1, 2; update the code or re-save the checkpoint")


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


def read_container(path, blob):
    """The first format's bytes (magic already seen) -> ({name: owned writable array}, meta),
    names and meta as that format stored them; CheckpointError if they are not valid."""
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


# first format's name -> today's (transformer/state.py): prefixes, then whole names
_PREFIXES = {"params/": "", "adamw/m/": "adamw.exp_avg.", "adamw/v/": "adamw.exp_avg_sq."}


def current_names(tensors, meta):
    """A first-format model checkpoint's (tensors, meta) as today's layout holds them: parameters
    under their bare names, the moments under adamw.exp_avg. / adamw.exp_avg_sq., the vocab
    (a tensor then) as a list in meta.  Names it does not know keep theirs, for check_state
    to refuse; the causal masks, which it never held, are left to the reader."""
    renamed = {}
    for name, array in tensors.items():
        old = next((p for p in _PREFIXES if name.startswith(p)), None)
        renamed[_PREFIXES[old] + name[len(old):] if old else name] = array
    meta = dict(meta)
    if "vocab" in renamed:
        meta["vocab"] = renamed.pop("vocab").tolist()  # odd shapes or dtypes stay odd, for check_state
    return renamed, meta
