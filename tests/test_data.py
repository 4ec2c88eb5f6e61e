"""Reading text, the default corpus, tokenizing, the book's split and random batches."""

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transformer import data
from transformer.errors import UserError
from transformer.tokenizer import get_tokenizer


# ---- read_text -------------------------------------------------------------------------

def test_read_text_reads_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo 变换器\n".encode("utf-8"))
    assert data.read_text(path) == "héllo 变换器\n"


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("whitespace", "is empty"),
    ("latin-1", "not valid UTF-8"),
])
def test_read_text_errors(tmp_path, kind, message):
    path = tmp_path / "t.txt"
    if kind == "directory":
        path.mkdir()
    contents = {"empty": b"", "whitespace": b" \n\t\n", "latin-1": "café".encode("latin-1")}
    if kind in contents:
        path.write_bytes(contents[kind])
    with pytest.raises(UserError, match=message) as info:
        data.read_text(path)
    assert str(path) in str(info.value)


def test_read_text_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("some text")

    def deny(*args, **kwargs):  # chmod 000 does not stop root, so fake the refusal
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data, "read_file", deny)
    with pytest.raises(UserError, match="Permission denied.*permissions"):
        data.read_text(path)


# ---- default corpus --------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text, cache dir) of one real build of the default corpus into a fresh cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGRAD_CACHE_DIR", str(cache))
        return data.default_corpus(), cache


def test_corpus_size_and_prose(corpus):
    text, _ = corpus
    assert 990_000 < len(text) <= data.CORPUS_CHARS
    letters_or_space = sum(c.isalpha() or c.isspace() for c in text)
    assert letters_or_space / len(text) > 0.85
    words = text.split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code or tables


def test_corpus_is_deterministic(corpus):
    small = data.build_default_corpus(limit=50_000)
    assert data.build_default_corpus(limit=50_000) == small
    assert 45_000 < len(small) <= 50_000
    assert corpus[0].startswith(small.rstrip("\n") + "\n\n")  # same rule, same order


def test_corpus_second_call_reads_cache(corpus, monkeypatch):
    text, cache = corpus
    (cached,) = os.listdir(cache)  # one file, no temp files left behind
    assert "py{}.{}".format(*sys.version_info[:2]) in cached
    assert (cache / cached).read_text(encoding="utf-8") == text
    monkeypatch.setenv("NANOGRAD_CACHE_DIR", str(cache))
    monkeypatch.setattr(data, "build_default_corpus", lambda: pytest.fail("rebuilt despite cache"))
    assert data.default_corpus() == text


def test_corpus_unwritable_cache_still_returns_text(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("NANOGRAD_CACHE_DIR", str(blocker / "cache"))  # cannot mkdir under a file
    monkeypatch.setattr(data, "build_default_corpus", lambda: "fresh text\n")
    assert data.default_corpus() == "fresh text\n"
    assert os.listdir(tmp_path) == ["a-file"]


def test_corpus_skips_tests_and_tools():
    root = data.sysconfig.get_paths()["stdlib"]
    files = [os.path.relpath(p, root) for p in data._stdlib_files(root)]
    assert "os.py" in files and os.path.join("json", "decoder.py") in files
    assert files == sorted(files)
    for path in files:
        parts = path.split(os.sep)
        assert not data.SKIP_DIRS & set(parts[:-1]), path
        assert not parts[-1].startswith("test_"), path


def test_corpus_rule_on_a_fake_stdlib(tmp_path):
    long = "This docstring is long enough to count as prose, {}."
    files = {
        "a.py": f'"""{long.format("module a")}"""\ndef f():\n    """Too short."""\n',
        "b.py": f'"""{long.format("module a")}"""\nclass B:\n    """{long.format("class B")}"""\n',
        "broken.py": f'"""{long.format("broken")}"""\ndef (:\n',
        "test_x.py": f'"""{long.format("test file")}"""\n',
        "pkg/c.py": f'"""{long.format("module c")}"""\n',
        "pkg/tests/d.py": f'"""{long.format("test suite")}"""\n',
        "site-packages/e.py": f'"""{long.format("site-packages")}"""\n',
        "z.py": f'"""{long.format("module z")}"""\n',
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    kept = [long.format(w) for w in ("module a", "class B", "module c", "module z")]  # no repeats
    assert data.build_default_corpus(tmp_path) == "\n\n".join(kept) + "\n"
    limit = sum(len(d) + 2 for d in kept[:3])  # room for exactly three
    assert data.build_default_corpus(tmp_path, limit) == "\n\n".join(kept[:3]) + "\n"
    assert data.build_default_corpus(tmp_path, limit - 1) == "\n\n".join(kept[:2]) + "\n"


def test_docstrings_skip_unparsable_files(tmp_path):
    good = tmp_path / "good.py"
    good.write_text('"""Module doc."""\nclass A:\n    """Class\n    doc."""\n    def f(self):\n'
                    '        """Method doc."""\n')
    bad = tmp_path / "bad.py"
    bad.write_text('"""Doc."""\ndef broken(:\n')
    assert data._docstrings(good) == ["Module doc.", "Class\ndoc.", "Method doc."]
    assert data._docstrings(bad) == []


def test_corpus_tokens_fit_vocabulary(corpus):
    ids = data.tokenize(corpus[0], get_tokenizer())
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert 150_000 < len(ids) < 400_000
    assert ids.min() >= 0 and ids.max() < get_tokenizer().n_vocab


# ---- tokenize, split, check_splits -----------------------------------------------------

def test_tokenize_treats_special_text_as_ordinary():
    enc = get_tokenizer()
    ids = data.tokenize("a <|endoftext|> b", enc)
    assert ids.dtype == np.int64
    assert enc.eot_token not in ids
    assert enc.decode(ids.tolist()) == "a <|endoftext|> b"


@given(st.integers(0, 5000))
def test_split_sizes(n):
    ids = np.arange(n, dtype=np.int64)
    train, val = data.split(ids)
    assert len(train) == int(n * 0.9)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)


def test_check_splits():
    data.check_splits(np.zeros(9), np.zeros(9), context_length=8)  # exactly enough
    with pytest.raises(UserError, match="validation split has 8 tokens.*at least 9.*--context-length"):
        data.check_splits(np.zeros(100), np.zeros(8), context_length=8)
    with pytest.raises(UserError, match="training split has 3 tokens"):
        data.check_splits(np.zeros(3), np.zeros(100), context_length=8)


# ---- get_batch ------------------------------------------------------------------------

@settings(max_examples=50)
@given(T=st.integers(1, 16), extra=st.integers(1, 50), B=st.integers(1, 8), seed=st.integers(0, 2**32))
def test_get_batch_windows(T, extra, B, seed):
    N = T + extra
    tokens = np.random.default_rng(seed).integers(0, 5, size=N)  # small vocab: ids repeat
    x, y = data.get_batch(tokens, B, T, np.random.default_rng(seed))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
    # The book's loop, with the same offsets drawn from a generator in the same state.
    offsets = np.random.default_rng(seed).integers(0, N - T, size=B)
    assert offsets.min() >= 0 and offsets.max() + T + 1 <= N
    np.testing.assert_array_equal(x, np.stack([tokens[o:o + T] for o in offsets]))
    np.testing.assert_array_equal(y, np.stack([tokens[o + 1:o + T + 1] for o in offsets]))


def test_get_batch_shift_and_bounds():
    positions = np.arange(20)  # token value = its position, so offsets are visible
    x, y = data.get_batch(positions, 500, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(4))
    assert set(x[:, 0]) == set(range(16))  # every offset 0..N-T-1 is drawn, none beyond
    x, y = data.get_batch(np.arange(5), 3, 4, np.random.default_rng(0))  # N = T + 1
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 5), (3, 1)))
