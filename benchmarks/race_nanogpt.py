"""Race nanoGPT on its own CPU benchmark: char-level tinyshakespeare, to its validation loss.

    python benchmarks/race_nanogpt.py --data ../shared/data/tinyshakespeare.txt
    python benchmarks/race_nanogpt.py --data ... --steps 1000 --lr 2e-3   # our own config

Trains FastModel + FastAdamW with nanoGPT's README settings for the CPU (issue 24):
B=12, T=64, 4 blocks, 4 heads, C=128, dropout 0, AdamW betas (0.9, 0.99), weight
decay 0.1 (on every parameter, as the book's AdamW; nanoGPT decays only its
matrices), gradient clip 1.0, lr 1e-3 warmed up over 100 steps then cosine to
1e-4 at the last step (nanoGPT's get_lr, its warm-up included), and
nanoGPT's data and evaluation: the vocabulary is the text's sorted characters,
the first 90% trains, and every 250 steps (and after the last) 20 random
batches of each split are averaged.  Like nanoGPT's loop, step 0 is evaluated
before any training and the run makes steps + 1 updates, the last after the
final evaluation, which this driver skips, as it changes no reported number.
Batches come from transformer.data.get_batch.

Prints each evaluation, then the wall time (from reading the text on) at which
the validation loss first reached --target (nanoGPT's final 1.886), the final
validation loss and the median step time.  With --stop-at-target the run ends there.
"""
import argparse
import math
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as train.py: the fast path chooses its own threads

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NANOGPT_VAL_LOSS = 1.886  # nanoGPT's final validation loss with the README command (issue 24)


def nanogpt_lr(step, lr, min_lr, warmup, decay_steps):
    """nanoGPT's get_lr: linear warm-up to lr over `warmup` steps, cosine down to min_lr at decay_steps."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def char_ids(text):
    """(ids, vocabulary): each character's index in the sorted set of the text's characters."""
    chars = sorted(set(text))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (N,) one code point each
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    return lookup[codes], chars


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                  "tinyshakespeare.txt"))
    p.add_argument("--steps", type=int, default=2000, help="nanoGPT's max_iters (= lr_decay_iters)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--eval-batch-size", type=int, default=12,
                   help="nanoGPT's evaluation batch (kept when --batch-size changes, so the evaluation stays its)")
    p.add_argument("--target", type=float, default=NANOGPT_VAL_LOSS)
    p.add_argument("--stop-at-target", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    from nanograd.clip import clip_grad_norm
    from nanograd.fast import FastAdamW
    from nanograd.fast.memory import keep_freed_memory
    from transformer.fast_model import FastModel
    from transformer.data import get_batch

    with open(args.data, encoding="utf-8") as f:
        ids, chars = char_ids(f.read())
    n = int(len(ids) * 0.9)
    splits = {"train": ids[:n], "val": ids[n:]}
    B, T = args.batch_size, args.context_length
    keep_freed_memory()  # as train.py
    model = FastModel(dict(d_model=args.d_model, num_blocks=args.num_blocks, num_heads=args.num_heads,
                           context_length=T, dropout=0.0, max_token_value=len(chars)), seed=args.seed)
    opt = FastAdamW(model.params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)

    def evaluate():
        model.eval()
        losses = {name: float(np.mean([model(*get_batch(data, args.eval_batch_size, T, rng))[1]
                                       for _ in range(args.eval_iters)]))
                  for name, data in splits.items()}
        model.train()
        return losses

    reached, step_ms, val = None, [], None
    for step in range(args.steps + 1):
        if step % args.eval_interval == 0 or step == args.steps:
            losses = evaluate()
            val, wall = losses["val"], time.perf_counter() - t_start
            print(f"step {step}: train {losses['train']:.4f} val {val:.4f} at {wall:.1f} s", flush=True)
            if reached is None and val <= args.target:
                reached = (step, wall)
                if args.stop_at_target:
                    break
            if step == args.steps:
                break
        t0 = time.perf_counter()
        opt.lr = nanogpt_lr(step, args.lr, args.min_lr, args.warmup, args.steps)
        model(*get_batch(splits["train"], B, T, rng))
        grads = model.backward()
        if args.clip:
            clip_grad_norm(grads, args.clip)
        opt.step(grads)
        step_ms.append(1000 * (time.perf_counter() - t0))
    total = time.perf_counter() - t_start
    hit = f"step {reached[0]}, {reached[1]:.1f} s" if reached else "never"
    print(f"reached val <= {args.target}: {hit}; final val {val:.4f}; wall {total:.1f} s; "
          f"median step {np.median(step_ms):.1f} ms over {len(step_ms)} steps")
    return reached


if __name__ == "__main__":
    main()
