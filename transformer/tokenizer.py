"""The cl100k_base BPE tokenizer, built offline from the vocabulary shipped in this package.

`tiktoken.get_encoding("cl100k_base")` downloads its vocabulary on first use; we ship
the same file gzipped (`cl100k_base.tiktoken.gz`), check its sha256 and hand the ranks
to `tiktoken.Encoding` ourselves, so nothing ever touches the network.
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
    can pick one) becomes U+FFFD, the character that stands for bytes that are not text."""
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
