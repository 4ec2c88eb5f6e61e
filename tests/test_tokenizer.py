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


# ---- --tokenizer char (issue 24.1) ----------------------------------------------------------

import copy  # noqa: E402
import re  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from transformer.state import load_state  # noqa: E402
from transformer.validate import check_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The corpus beside the repository (../shared/data, or ../../shared/data from a worktree), never downloaded.
SHAKESPEARE = next((path for path in (os.path.join(REPO, *up, "shared", "data", "tinyshakespeare.txt")
                                      for up in (("..",), ("..", ".."))) if os.path.exists(path)), "")
# nanoGPT's data/shakespeare_char/prepare.py prints these 65 for tinyshakespeare.
NANOGPT_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SMALL_TEXT = ("First Citizen:\r\nBefore we proceed any further, hear me speak.\n"
              "\tcafé 变换器 🤖👩‍👩‍👧 \x00\x7f\u2028 end")
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import inference  # noqa: E402
import train  # noqa: E402

TINY = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "16", "--batch-size", "4",
        "--eval-interval", "5", "--eval-iters", "2", "--no-progress", "--tokenizer", "char"]


def test_char_vocabulary_is_the_sorted_distinct_characters_and_round_trips():
    """A text the test writes, with a CRLF, tabs, accents, CJK, emoji joined by ZWJ, NUL, DEL and a
    line separator: every character is its own id, in code point order, and decode(encode) is the text."""
    char = tokenizer.CharTokenizer.from_text(SMALL_TEXT)
    assert char.chars == "".join(sorted(set(SMALL_TEXT)))
    ids = char.encode_ordinary(SMALL_TEXT)
    assert ids.dtype == np.int64 and len(ids) == len(SMALL_TEXT)
    assert [char.chars[i] for i in ids] == list(SMALL_TEXT)
    assert char.decode(ids) == SMALL_TEXT and char.decode(ids.tolist()) == SMALL_TEXT
    assert char.unknown("Zebra café!") == "!Zb"  # (z: "Citizen")


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tinyshakespeare.txt is not beside the repository "
                    "(../shared/data); users' clones have no copy, the small-text test covers the code")
def test_tinyshakespeare_has_nanogpts_65_characters_and_every_one_round_trips():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    char = tokenizer.CharTokenizer.from_text(text)
    assert char.chars == NANOGPT_CHARS and len(char.chars) == 65
    ids = char.encode_ordinary(text)
    assert len(ids) == len(text) == 1115394  # nanoGPT's "length of dataset in characters"
    assert char.decode(ids) == text


def test_a_prompt_character_outside_the_vocabulary_is_one_line():
    char = tokenizer.CharTokenizer.from_text("abc ")
    with pytest.raises(UserError) as error:
        tokenizer.encode_prompt("a cab é#", char, None, 4)
    assert str(error.value) == ("the prompt has 2 character(s) the model never saw in training (e.g. '#', 'é'); "
                                "its vocabulary is the 4 characters of its training text")
    with pytest.raises(UserError, match="e.g. '\ufffd'"):  # a command-line byte that is not UTF-8 reads as U+FFFD
        tokenizer.encode_prompt("ab\udcff", char, None, 4)
    assert tokenizer.encode_prompt("cab", char, None, 4).tolist() == [3, 1, 2]


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL_TEXT * 40, encoding="utf-8")
    return path


def run_train(argv, capsys):
    code = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_a_char_run_resumes_bit_exactly_and_inference_speaks_its_characters(small_text, tmp_path, capsys):
    """16 steps straight == 8 steps, then resumed to 16 (the characters read back from the
    checkpoint); inference.py encodes the prompt and decodes the sample with them."""
    straight, resumed = tmp_path / "straight.ckpt", tmp_path / "resumed.ckpt"
    nanogpt = ["--beta2", 0.99, "--weight-decay", 0.1, "--weight-decay-on", "matrices"]  # kept by the resume
    run_train(["--data", small_text, *TINY, *nanogpt, "--max-iters", 16, "--out", straight], capsys)
    run_train(["--data", small_text, *TINY, *nanogpt, "--max-iters", 8, "--out", resumed], capsys)
    run_train(["--resume", resumed, "--max-iters", 16, "--no-progress"], capsys)
    (t1, m1), (t2, m2) = load_state(straight), load_state(resumed)
    assert m1["run"]["tokenizer"] == "char" and m1["run"]["chars"] == "".join(sorted(set(SMALL_TEXT)))
    assert m1["h_params"]["max_token_value"] == len(set(SMALL_TEXT))
    untimed = lambda run: {k: v for k, v in run.items() if k != "time_s"}  # noqa: E731 (seconds differ)
    assert m2["step"] == 16 and untimed(m2["run"]) == untimed(m1["run"])
    for name in t1:
        np.testing.assert_array_equal(t2[name], t1[name], err_msg=name)
    assert inference.main(["--ckpt", str(straight), "--prompt", "café 🤖", "--max-new-tokens", "30"]) == 0
    sample = capsys.readouterr().out.split("---------------\n")[1]
    assert sample.startswith("café 🤖") and len(sample) == len("café 🤖") + 30 + 1
    assert set(sample[:-1]) <= set(SMALL_TEXT)
    assert inference.main(["--ckpt", str(straight), "--prompt", "xyz"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_char_with_an_empty_file_or_other_data_on_resume_is_one_line(small_text, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train.main(["--data", str(empty), *TINY, "--out", str(tmp_path / "e.ckpt")]) == 2
    assert capsys.readouterr().err == f"error: text file {empty} is empty; give a file with some text in it\n"
    ckpt = tmp_path / "m.ckpt"
    run_train(["--data", small_text, *TINY, "--max-iters", 4, "--out", ckpt], capsys)
    other = tmp_path / "other.txt"
    other.write_text(SMALL_TEXT * 40 + "Zebra!", encoding="utf-8")
    assert train.main(["--resume", str(ckpt), "--data", str(other), "--max-iters", "8"]) == 2
    assert capsys.readouterr().err == ("error: the data has 3 character(s) the resumed run's vocabulary lacks "
                                       "(e.g. '!', 'Z', 'b'); resume with the same --data\n")
    assert train.main(["--data", str(small_text), *TINY, "--compact-vocab", "--out", str(tmp_path / "c.ckpt")]) == 2
    assert "drop one of the two" in capsys.readouterr().err
    assert train.main(["--resume", str(ckpt), "--tokenizer", "cl100k_base", "--max-iters", "8"]) == 2
    assert "--tokenizer differs from the checkpoint's ('char')" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda run: run.update(chars="ba"), "run.chars"),
    (lambda run: run.update(chars="a\ud800"), "run.chars"),
    (lambda run: run.update(chars=run["chars"][:-1]), "characters for a vocabulary of"),
    (lambda run: run.pop("chars"), "no characters"),
    (lambda run: run.pop("tokenizer"), "with 4 characters"),
    (lambda run: run.update(tokenizer="cl100k_base"), "with 4 characters"),
    (lambda run: run.update(tokenizer="bpe"), "run.tokenizer"),
])
def test_a_char_checkpoint_with_edited_characters_is_refused(small_text, tmp_path, capsys, edit, message):
    """transformer/validate.py's check_state: the characters are distinct and sorted, one per
    output row, and present exactly when run.tokenizer is char."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abba cab " * 200)
    ckpt = tmp_path / "m.ckpt"
    run_train(["--data", tiny, *TINY, "--max-iters", 2, "--out", ckpt], capsys)
    tensors, meta = load_state(ckpt)
    assert meta["run"]["chars"] == " abc"
    bad = copy.deepcopy(meta)
    edit(bad["run"])
    with pytest.raises(UserError, match=re.escape(message)):
        check_state(tensors, bad, "m.ckpt", "nanograd-transformer")
