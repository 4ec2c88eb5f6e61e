"""Sampling from the model: the book's ch.20 loop, plus top-p, a repetition
penalty, and a key/value cache so each new token costs one position's work.

Without the cache every step re-runs the model over the whole (cropped)
context.  With it, each block keeps the keys and values of the positions
seen so far, and a step runs only the newest position through the blocks,
its query attending to all cached keys.  The book's positions are absolute
(0 .. context_length-1 within the window), so once the text outgrows the
window every position shifts and the cache is stale: from then on each step
re-encodes the last context_length ids, exactly as the uncached loop does.
"""
import numpy as np

from nanograd import layernorm_forward, linear_forward, relu_forward
from nanograd.attention import merge_heads, project_heads
from nanograd.backend import get_array_module, to_host


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, rng=None, kv_cache=True, stop=None):
    """idx (B, T) ints -> (B, T + max_new_tokens) host int64; rng a NumPy Generator (default seed 0);
    stop() true before a token (e.g. after Ctrl-C) ends it early, with the tokens so far."""
    rng = np.random.default_rng(0) if rng is None else rng
    idx = np.array(idx, dtype=np.int64).reshape(len(idx), -1)  # (B, T)
    was_training, model.training = model.training, False
    cache = None
    try:
        for _ in range(max_new_tokens):
            if stop is not None and stop():
                break
            window = idx[:, -model.context_length:]  # (B, <=T)
            if not kv_cache:  # the book's loop: the whole window through the blocks, every step
                logits = KVCache(model, len(idx)).run(window)  # (B, V) a fresh cache: nothing reused
            elif cache is not None and idx.shape[1] <= model.context_length:
                logits = cache.run(window[:, -1:])  # (B, V) only the newest position
            else:
                cache = KVCache(model, len(idx))
                logits = cache.run(window)  # (B, V) the whole window, filling the cache
            logits = to_host(logits).astype(np.float64)  # (B, V)
            next_ids = sample(logits, temperature, top_k, top_p, repetition_penalty, idx, rng)  # (B,)
            idx = np.concatenate([idx, next_ids[:, None]], axis=1)
    finally:
        model.training = was_training
    return idx


def attend(q, k, v, first_position):
    """softmax(q @ k.T / sqrt(hs)) @ v, query t sitting at position first_position + t.

    q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) -> (B, NH, Tq, hs); a query sees
    only keys at or before its own position.
    """
    xp = get_array_module(q)
    Tq, Tk, hs = q.shape[2], k.shape[2], q.shape[3]
    preatt = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / hs ** 0.5)  # (B, NH, Tq, Tk)
    future = xp.arange(Tk)[None, :] > (first_position + xp.arange(Tq))[:, None]  # (Tq, Tk)
    preatt = xp.where(future, -xp.inf, preatt)  # (B, NH, Tq, Tk)
    preatt -= preatt.max(axis=-1, keepdims=True)
    att = xp.exp(preatt)  # (B, NH, Tq, Tk)
    att /= att.sum(axis=-1, keepdims=True)
    return att @ v  # (B, NH, Tq, hs)


class KVCache:
    """Every block's keys and values, (B, NH, context_length, hs), for positions 0 .. filled-1."""

    def __init__(self, model, B):
        NH, hs, _ = model.blocks[0].Wq.shape
        shape = (B, NH, model.context_length, hs)
        self.model = model
        self.keys = [model.xp.zeros(shape, model.dtype) for _ in model.blocks]  # (B, NH, T, hs) each
        self.values = [model.xp.zeros(shape, model.dtype) for _ in model.blocks]  # (B, NH, T, hs) each
        self.filled = 0

    def run(self, ids):
        """The next positions ids (B, t) through every block (eval mode); the last position's logits (B, V)."""
        model, xp = self.model, self.model.xp
        B, t = ids.shape
        start, end = self.filled, self.filled + t
        x = model.embedding[xp.asarray(ids)] + model.positions[start:end]  # (B, t, C)
        for blk, K, V in zip(model.blocks, self.keys, self.values):
            NH, hs, C = blk.Wq.shape
            h = layernorm_forward(x, blk.ln1_w, blk.ln1_b)[0]  # (B, t, C)
            q, k, v = project_heads(h, blk.Wq), project_heads(h, blk.Wk), project_heads(h, blk.Wv)  # (B, NH, t, hs)
            K[:, :, start:end], V[:, :, start:end] = k, v  # remember this step's keys and values
            y = attend(q, K[:, :, :end], V[:, :, :end], start)  # (B, NH, t, hs)
            y = merge_heads(y).reshape(B, t, NH * hs)  # (B, t, C) heads concatenated
            x = x + linear_forward(y, blk.proj_W, blk.proj_b)[0]  # (B, t, C)
            h = layernorm_forward(x, blk.ln2_w, blk.ln2_b)[0]  # (B, t, C)
            h = relu_forward(linear_forward(h, blk.fc1_W, blk.fc1_b)[0])[0]  # (B, t, 4C)
            x = x + linear_forward(h, blk.fc2_W, blk.fc2_b)[0]  # (B, t, C)
        self.filled = end
        x = layernorm_forward(x[:, -1], model.final_ln_w, model.final_ln_b)[0]  # (B, C)
        return linear_forward(x, model.head_W, model.head_b)[0]  # (B, V)


def sample(logits, temperature, top_k, top_p, repetition_penalty, history, rng):
    """One id per row of logits (B, V) (host float64); history (B, T) the ids so far.

    A penalty or temperature so extreme that scaling by it overflows acts as its limit, as
    for ever more extreme values: only the largest of the logits sent to infinity can be
    drawn, and a temperature that sends every other logit to -inf is greedy."""
    original, logits = logits, logits.copy()
    with np.errstate(over="ignore"):  # an overflow to +-inf is the limit, taken below
        if repetition_penalty != 1.0:  # CTRL: shrink the logits of tokens already present
            for row, ids in zip(logits, history):
                seen = np.unique(ids)
                row[seen] = np.where(row[seen] > 0, row[seen] / repetition_penalty, row[seen] * repetition_penalty)
        top = logits.max(axis=-1, keepdims=True)  # (B, 1)
        for b in np.flatnonzero(~np.isfinite(top[:, 0])):  # the penalty overflowed: l / p -> +inf (or all -inf)
            at_top = logits[b] == top[b]  # (V,) the ids it sent to infinity
            best = original[b][at_top].max()  # among them, l / p grows fastest for the largest l
            logits[b] = np.where(at_top & (original[b] == best), 0.0, -np.inf)  # (V,)
            top[b] = 0.0
        if temperature == 0:
            return logits.argmax(axis=-1)  # (B,)
        logits = (logits - top) / temperature  # (B, V) <= 0: a tiny temperature sends all but the max to -inf
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]  # (B, 1)
        logits[logits < kth] = -np.inf
    probs = np.exp(logits)  # (B, V) the largest logit is 0: no overflow
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:  # keep the most likely ids until their mass reaches top_p
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)  # (B, V)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the more likely ids
        np.put_along_axis(probs, order, np.where(before < top_p, sorted_probs, 0.0), axis=-1)
    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    u = rng.random(len(logits))[:, None] * cdf[:, -1:]  # (B, 1)
    return (cdf <= u).sum(axis=-1).clip(max=logits.shape[-1] - 1)  # (B,)
