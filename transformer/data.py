"""Text in, token batches out: reading a corpus, the built-in default corpus, splits and batches.

Mirrors the book's train.py: tokenize the whole text, keep the first 90% for training
and the rest for validation, and draw random windows of `context_length` tokens with
targets shifted by one.
"""

import ast
import os
import sys
import sysconfig

import numpy as np

from .errors import UserError
from .outputs import replacing
from .validate import read_file

# Memory per byte of a text file: the bytes, the str, tiktoken's list of ids and their int64 array.
TEXT_BYTES_PER_BYTE = 16
CORPUS_CHARS = 1_000_000  # the default corpus stops before exceeding this many characters
MIN_DOCSTRING_CHARS = 40  # shorter docstrings are mostly "Return x." one-liners, not prose
# Directories of the standard library that hold no library prose of their own.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
             "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def read_text(path) -> str:
    """Read a UTF-8 text file; UserError (naming the path) if it is unusable."""
    if not os.path.exists(path):
        raise UserError(f"text file {path} does not exist; pass the path of a UTF-8 text file")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the path of a UTF-8 text file")
    try:
        raw = read_file(path, "text file", per_byte=TEXT_BYTES_PER_BYTE)  # never a FIFO or a device
    except OSError as e:
        raise UserError(f"cannot read text file {path} ({e.strerror}); check its permissions") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file {path} is not valid UTF-8 (bad byte at offset {e.start}); "
                        "convert it to UTF-8") from e
    if not text.strip():
        raise UserError(f"text file {path} is empty; give a file with some text in it")
    return text


def _stdlib_files(root):
    """All .py files under the stdlib root, minus test suites and tools, in sorted order."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [os.path.join(folder, n) for n in names
                  if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def _definitions(statements):
    """Classes and functions among `statements` and in their nested blocks, in source order."""
    for node in statements:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, field, None)
            if isinstance(block, list):  # statement blocks only, never expressions
                yield from _definitions(block)


def _docstrings(path):
    """Cleaned module, class and function docstrings of one file, in source order."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError, RecursionError):
        return []
    docs = (ast.get_docstring(n, clean=True) for n in [tree, *_definitions(tree.body)])
    return [d for d in docs if d]  # clean=True dedents like inspect.cleandoc


def build_default_corpus(root=None, limit=CORPUS_CHARS) -> str:
    """Join stdlib docstrings with blank lines until the next one would pass `limit` chars."""
    root = root or sysconfig.get_paths()["stdlib"]
    parts, size, seen = [], 0, set()
    for path in _stdlib_files(root):
        for doc in _docstrings(path):
            if len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
                continue
            if size + len(doc) + 2 > limit:
                return "\n\n".join(parts) + "\n"
            seen.add(doc)
            parts.append(doc)
            size += len(doc) + 2
    return "\n\n".join(parts) + "\n"


def _cache_path():
    """Where the default corpus is cached: $NANOGRAD_CACHE_DIR or ~/.cache/nanograd-transformer."""
    folder = os.environ.get("NANOGRAD_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "nanograd-transformer")
    version = "{}.{}.{}".format(*sys.version_info[:3])
    return os.path.join(folder, f"stdlib-docstrings-py{version}-v1.txt")


def default_corpus() -> str:
    """The built-in corpus: about 1 MB of prose from the Python standard library's docstrings.

    Rule: walk the stdlib's .py files (from `sysconfig`) in sorted path order, skipping
    test suites, site-packages, idlelib, lib2to3 and turtledemo; parse each with `ast`
    (never import it; files that fail to parse are skipped); take module, class and
    function docstrings in source order, dedented like `inspect.cleandoc`; drop those
    under 40 characters and exact repeats; join them with blank lines and stop before
    the first docstring that would take the text past 1,000,000 characters.
    The text is cached on first build (see `_cache_path`; per Python version), written
    atomically; an unwritable cache directory just means no cache.
    """
    path = _cache_path()
    try:
        return read_file(path, "corpus cache").decode("utf-8")  # a FIFO there is skipped, not waited on
    except (OSError, UnicodeDecodeError, UserError):
        pass
    text = build_default_corpus()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    except OSError:
        pass
    return text


def tokenize(text, tokenizer) -> np.ndarray:
    """Token ids of `text` as int64, via `encode_ordinary`: "<|endoftext|>" in the text is plain text."""
    return np.asarray(tokenizer.encode_ordinary(text), dtype=np.int64)  # (N,)


def split(ids, train_fraction=0.9):
    """The book's split: the first `int(len(ids) * train_fraction)` tokens train, the rest validate."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def check_splits(train, val, context_length):
    """UserError unless both splits hold at least `context_length + 1` tokens (one window + target)."""
    need = context_length + 1
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) < need:
            raise UserError(f"the {name} split has {len(ids)} tokens but context length "
                            f"{context_length} needs at least {need}; lower --context-length "
                            "or give more text")


def get_batch(data, batch_size, context_length, rng):
    """Random windows x = data[o:o+T] and targets y = data[o+1:o+T+1], both (B, T) int64."""
    offsets = rng.integers(0, len(data) - context_length, size=batch_size)  # (B,)
    index = offsets[:, None] + np.arange(context_length)  # (B, T)
    x = np.asarray(data[index], dtype=np.int64)  # (B, T)
    y = np.asarray(data[index + 1], dtype=np.int64)  # (B, T)
    return x, y
