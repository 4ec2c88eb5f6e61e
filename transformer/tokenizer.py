"""The tokenizers: cl100k_base (the book's) and characters (nanoGPT's shakespeare_char).

`tiktoken.get_encoding("cl100k_base")` downloads its vocabulary on first use; we ship
the same file gzipped (`cl100k_base.tiktoken.gz`), check its sha256 and hand the ranks
to `tiktoken.Encoding` ourselves, so nothing ever touches the network.

`--tokenizer char` numbers the distinct characters of the whole training text in
sorted order, as nanoGPT's data/shakespeare_char/prepare.py does (65 for
tinyshakespeare); a checkpoint keeps them as the string run["chars"].
"""

import base64
import functools
import gzip
import hashlib
import itertools
import os
import zlib

import numpy as np
import tiktoken

from .errors import UserError

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cl100k_base.tiktoken.gz")
# sha256 of the decompressed file, the same hash tiktoken_ext/openai_public.py checks.
VOCAB_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# cl100k_base's split regex and special tokens, exactly as tiktoken defines them.
PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
ORDINARY_IDS = 100256  # ranks 0 .. 100255: every id encode_ordinary can give; 100256 and 100261-100275 have no text


def _read_vocab(path):
    """Return the decompressed vocabulary bytes, after checking their sha256."""
    corrupt = f"the packaged tokenizer file {path} is missing or corrupt; reinstall the package"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(corrupt) from e
    if hashlib.sha256(raw).hexdigest() != VOCAB_SHA256:
        raise UserError(corrupt)
    return raw


def _parse_ranks(raw):
    """Parse `<base64 token> <rank>` lines into {token bytes: rank}."""
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """Return the cl100k_base `tiktoken.Encoding`, built once from the packaged file."""
    ranks = _parse_ranks(_read_vocab(VOCAB_FILE))
    return tiktoken.Encoding(
        name="cl100k_base", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKENS
    )


def decode(tokenizer, ids):
    """The text of ids; an id without text in cl100k_base (a model with a larger output layer
    can pick one) becomes U+FFFD, the character that stands for bytes that are not text.
    A CharTokenizer decodes itself: each of its ids is a character."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.decode(ids)

    def has_text(i):
        return 0 <= i < ORDINARY_IDS or i in SPECIAL_TOKENS.values()
    pieces = [tokenizer.decode_bytes(list(run)) if known else "\ufffd".encode() * len(list(run))
              for known, run in itertools.groupby(map(int, ids), key=has_text)]
    return b"".join(pieces).decode("utf-8", errors="replace")  # as tokenizer.decode does


def encode_prompt(prompt, tokenizer, vocab, vocab_size):
    """The prompt's ids in the model's numbering; UserError if a token lies outside the vocabulary."""
    # Under a C locale Python reads the command line's bytes as ASCII, each other byte escaped
    # (U+DC80..U+DCFF): give them back and read them as UTF-8 (anything else becomes U+FFFD).
    prompt = prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    unknown = tokenizer.unknown(prompt) if isinstance(tokenizer, CharTokenizer) else ""
    if unknown:
        raise UserError(f"the prompt has {len(unknown)} character(s) the model never saw in training "
                        f"({describe_chars(unknown)}); its vocabulary is the {len(tokenizer.chars)} characters "
                        "of its training text")
    ids = np.asarray(tokenizer.encode_ordinary(prompt), dtype=np.int64)
    if len(ids) == 0:
        raise UserError("--prompt is empty; give at least one character of text.")
    if vocab is not None:  # a --compact-vocab model knows only the ids of its corpus
        pos = np.searchsorted(vocab, ids).clip(max=len(vocab) - 1)
        unknown = ids[vocab[pos] != ids]
        ids = pos
    else:
        unknown = ids[ids >= vocab_size]
    if len(unknown):
        pieces = ", ".join(repr(tokenizer.decode([int(i)])) for i in unknown[:3])
        raise UserError(f"the prompt has {len(unknown)} token(s) the model never saw in training "
                        f"(e.g. {pieces}); rephrase the prompt")
    return ids


class CharTokenizer:
    """Id i is chars[i], the i-th of the sorted distinct characters of the training text.

    Same two methods as tiktoken's Encoding (encode_ordinary, decode), so the data
    pipeline and inference.py take either.  Characters are compared as code points,
    which is how Python sorts strings: chars == "".join(sorted(set(text))).
    """

    def __init__(self, chars):
        self.chars = chars
        self.points = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)  # (V,) sorted code points

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    def _positions(self, text):
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (N,) a lone
        # surrogate (a byte of a command line that is not UTF-8) is a code point no text file has
        ids = np.searchsorted(self.points, points)  # (N,) int64
        np.minimum(ids, len(self.points) - 1, out=ids)  # past the last: compared (and refused) as the last
        return points, ids

    def unknown(self, text):
        """The characters of text outside the vocabulary, sorted."""
        points, ids = self._positions(text)
        return "".join(sorted(set(chr(c) for c in points[self.points[ids] != points])))

    def encode_ordinary(self, text):
        """(N,) int64 ids of text's characters; UserError if one is outside the vocabulary."""
        points, ids = self._positions(text)
        if (self.points[ids] != points).any():
            raise UserError(f"the text has characters outside the model's {len(self.chars)}-character "
                            f"vocabulary ({describe_chars(self.unknown(text))})")
        return ids.astype(np.int64, copy=False)

    def decode(self, ids):
        return "".join(map(self.chars.__getitem__, np.asarray(ids, dtype=np.int64).tolist()))  # (not NumPy's
        # str arrays: they drop a trailing NUL, and a text may hold one)


def describe_chars(chars, limit=3):
    """'e.g. 'é', '#'' : the first few characters of chars, quoted."""
    return "e.g. " + ", ".join(repr(c) for c in chars[:limit])


def run_tokenizer(run):
    """The tokenizer a checkpoint's run settings name: CharTokenizer(run["chars"]) or cl100k_base."""
    return CharTokenizer(run["chars"]) if run.get("tokenizer") == "char" else get_tokenizer()


def training_tokenizer(kind, text, saved_run=None):
    """train.py's tokenizer: cl100k_base, or for kind "char" the sorted characters of the whole
    text (nanoGPT's prepare.py), or of the resumed run (saved_run["chars"]), which must cover text."""
    if kind != "char":
        return get_tokenizer()
    if not saved_run:
        return CharTokenizer.from_text(text)
    tokenizer = CharTokenizer(saved_run["chars"])
    unknown = tokenizer.unknown(text)
    if unknown:
        raise UserError(f"the data has {len(unknown)} character(s) the resumed run's vocabulary lacks "
                        f"({describe_chars(unknown)}); resume with the same --data")
    return tokenizer
