"""The packaged cl100k_base tokenizer: offline, hash-checked, identical to tiktoken's own."""

import gzip
import hashlib
import socket

import pytest
import tiktoken
import tiktoken.registry

from transformer import tokenizer
from transformer.errors import UserError

URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != None: pass\r\n",
    "变换器架构是一种神经网络。日本語のテキストも。",
    "emoji 🤖🎉👩‍👩‍👧 and accents: café naïve Ærøskøbing",
    "spaces    and\n\n\n\nnewlines   \t\t  \n  ",
    "numbers 1234567890 3.14159 -42 1e-8, contractions: I'm, you'LL, they've",
    "literal <|endoftext|> text",
    "",
]


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a connection fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def official(tmp_path, monkeypatch, no_network):
    """tiktoken's own cl100k_base, loaded offline from a cache we fill with our file."""
    with gzip.open(tokenizer.VOCAB_FILE, "rb") as f:
        (tmp_path / hashlib.sha1(URL.encode()).hexdigest()).write_bytes(f.read())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    return tiktoken.get_encoding("cl100k_base")


@pytest.fixture
def fresh(monkeypatch):
    """Clear the get_tokenizer cache before and after the test."""
    tokenizer.get_tokenizer.cache_clear()
    yield
    tokenizer.get_tokenizer.cache_clear()


def test_packaged_file_has_official_hash():
    with gzip.open(tokenizer.VOCAB_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tokenizer.VOCAB_SHA256


def test_builds_without_network(fresh, no_network):
    enc = tokenizer.get_tokenizer()
    assert enc.name == "cl100k_base"
    assert enc.n_vocab == 100277
    assert tokenizer.get_tokenizer() is enc  # cached


def test_matches_official_encoding(official):
    ours = tokenizer.get_tokenizer()
    assert ours._pat_str == official._pat_str
    assert ours._special_tokens == official._special_tokens
    assert ours._mergeable_ranks == official._mergeable_ranks
    for text in TEXTS:
        ids = ours.encode(text, disallowed_special=())
        assert ids == official.encode(text, disallowed_special=()), text
        assert ours.decode(ids) == text
    assert ours.encode("<|endoftext|>", allowed_special="all") == [100257]


def test_corrupt_file_is_user_error(fresh, tmp_path, monkeypatch):
    with gzip.open(tokenizer.VOCAB_FILE, "rb") as f:
        raw = bytearray(f.read())
    raw[1000] ^= 1  # one flipped bit in a valid gzip stream: only the hash can tell
    bad = tmp_path / "bad.tiktoken.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setattr(tokenizer, "VOCAB_FILE", str(bad))
    with pytest.raises(UserError, match="corrupt.*reinstall"):
        tokenizer.get_tokenizer()


@pytest.mark.parametrize("kind", ["missing", "empty", "not gzip", "truncated gzip"])
def test_unreadable_file_is_user_error(fresh, tmp_path, monkeypatch, kind):
    bad = tmp_path / "bad.tiktoken.gz"
    contents = {"empty": b"", "not gzip": b"not gzip at all",
                "truncated gzip": open(tokenizer.VOCAB_FILE, "rb").read()[:5000]}
    if kind in contents:
        bad.write_bytes(contents[kind])
    monkeypatch.setattr(tokenizer, "VOCAB_FILE", str(bad))
    with pytest.raises(UserError, match="reinstall"):
        tokenizer.get_tokenizer()


def test_decode_gives_ids_without_text_as_the_replacement_character():
    """Issue 23.9: cl100k_base has no text for 100256 and 100261-100275, and tiktoken's decode
    raises KeyError on them; a model with a larger output layer can pick one."""
    enc = tokenizer.get_tokenizer()
    ids = enc.encode_ordinary("Hello, world") + [100256] + enc.encode("<|endoftext|>", allowed_special="all")
    assert tokenizer.decode(enc, ids + [100270, 100275]) == "Hello, world\ufffd<|endoftext|>\ufffd\ufffd"
    for text in TEXTS:  # everything else exactly as tiktoken decodes it
        assert tokenizer.decode(enc, enc.encode(text, allowed_special="all")) == text


def test_inference_prints_an_id_without_text_instead_of_crashing(tmp_path):
    """A checkpoint that passes validation (max_token_value 100277, its output bias favouring
    100256) made inference.py crash in the decoder with a KeyError."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from transformer import Model
    from transformer.state import save_state
    model = Model(dict(d_model=16, num_blocks=1, num_heads=2, context_length=8, max_token_value=100277))
    model.params["model_out_linear_layer.bias"][...] = np.where(np.arange(100277) == 100256, 100.0, 0.0)
    save_state(tmp_path / "m.ckpt", model)
    result = subprocess.run([sys.executable, "inference.py", "--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "Hi",
                             "--max-new-tokens", "3", "--temperature", "0"], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "Hi\ufffd\ufffd\ufffd\n" in result.stdout, result.stdout


def test_a_prompt_read_under_a_c_locale_is_read_as_utf8():
    """`LC_ALL=C PYTHONUTF8=0 inference.py --prompt '销售'`: Python hands over the bytes as escapes
    (U+DC80..U+DCFF); the prompt is the UTF-8 text they spell, as in any other locale."""
    enc = tokenizer.get_tokenizer()
    escaped = "销售 sales".encode("utf-8").decode("ascii", "surrogateescape")
    assert escaped != "销售 sales"
    ids = tokenizer.encode_prompt(escaped, enc, None, 100256)
    assert ids.tolist() == enc.encode_ordinary("销售 sales")
    assert tokenizer.encode_prompt(b"\xff ok".decode("ascii", "surrogateescape"), enc, None, 100256).tolist() \
        == enc.encode_ordinary("\ufffd ok")  # bytes that are not UTF-8
