"""Training-step time across model sizes: our fast path against the book's PyTorch model, with each size's floor.

    python benchmarks/bench_sizes.py                                  # ~10 min on 2 busy cores
    python benchmarks/bench_sizes.py --out benchmarks/results/sizes.md

Sizes: nanoGPT's char-level CPU config (issue 24), the book's config, the book's
with --compact-vocab, and the book's with d_model 256 and 512.  A step is
forward + backward + AdamW, as train.py runs it (FastModel + FastAdamW, the
output layer's update begun mid-backward) and as the book's ch.19 loop runs it
(PyTorch eager, its default threads; and again with torch.set_num_threads(1),
a comparison that a busy machine distorts less: PyTorch's OpenMP threads wait
for each other at every operation, so one descheduled thread stalls them all).  Each side runs in a process of its own,
so neither's idle threads (OpenBLAS's spin, PyTorch's OpenMP pool) steal the
other's cores; the processes alternate, ROUNDS of each per size, and the
table gives the median over all their timed steps (the machine may be shared:
alternating spreads its load over both sides).

The floor is what the step cannot go under on this machine: its matrix
FLOPs at the sgemm rate measured on all cores (the blocks' products at the
rate of their (B*T, C) x (C, 4C) shape, the output layer's at the rate of its
own shape, both cut over the cores as the fast path cuts them), plus the bytes
a step must move (bench_cpu.step_bytes) at the measured copy bandwidth.
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as train.py; the torch child resets it

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_cpu import BOOK, COMPACT_VOCAB, VOCAB, batches, machine, step_bytes  # noqa: E402

CHAR = dict(d_model=128, num_blocks=4, num_heads=4, context_length=64, batch_size=12, dropout=0.0)
CHAR_VOCAB = 65  # tinyshakespeare's characters
ROUNDS = 2  # child processes per side and size, alternating


def sizes():
    """(name, config, vocabulary) of each size in the sweep."""
    return [("char (nanoGPT CPU)", dict(CHAR), CHAR_VOCAB),
            ("book", dict(BOOK), VOCAB),
            ("book --compact-vocab", dict(BOOK), COMPACT_VOCAB),
            ("book d_model 256", dict(BOOK, d_model=256), VOCAB),
            ("book d_model 512", dict(BOOK, d_model=512), VOCAB)]


def child(impl, cfg, vocab, steps, warmup):
    """In a child process: time warmup + steps training steps of one side; print their ms as JSON."""
    data = batches(cfg, vocab, warmup + steps)
    if impl == "numpy":
        from nanograd.fast import FastAdamW
        from nanograd.fast.memory import keep_freed_memory
        from transformer.fast_model import FastModel
        keep_freed_memory()  # as train.py
        model = FastModel({**cfg, "max_token_value": vocab}, dtype="float32", seed=0)
        opt = FastAdamW(model.params, lr=1e-3)
        model.head_ready = opt.start  # as train.py

        def step(x, y):
            model(x, y)
            opt.step(model.backward())
    else:
        import torch
        from transformer import book_torch
        if impl == "torch1":
            torch.set_num_threads(1)
        model = book_torch.Model({**cfg, "max_token_value": vocab}).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(x, y):
            book_torch.book_train_step(model, opt, torch.from_numpy(x), torch.from_numpy(y))
    times = []
    for x, y in data:
        t0 = time.perf_counter()
        step(x, y)
        times.append(1000 * (time.perf_counter() - t0))
    print(json.dumps(times[warmup:]))


def run_child(impl, cfg, vocab, steps, warmup):
    env = dict(os.environ)
    if impl != "numpy":
        env.pop("OPENBLAS_NUM_THREADS", None)  # PyTorch uses its own BLAS and threads; leave it as a user has it
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, json.dumps(cfg),
                          str(vocab), str(steps), str(warmup)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_flops(cfg, vocab):
    """(blocks', output layer's) matrix FLOPs of one training step: forward 2mnk per product, backward twice that."""
    N, T, C, L = cfg["batch_size"] * cfg["context_length"], cfg["context_length"], cfg["d_model"], cfg["num_blocks"]
    blocks = 2 * N * C * (3 * C + C + 4 * C + 4 * C) * L + 2 * 2 * cfg["batch_size"] * T * T * C * L
    return 3 * blocks, 3 * 2 * N * C * vocab


def sgemm_rate(N, K, M, repeats=7):
    """FLOP/s of (N, K) @ (K, M), the M columns cut over every CPU thread, best of repeats."""
    from nanograd.fast.threads import cpu_threads, parallel, split_range
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, K), dtype=np.float32)
    W = rng.standard_normal((M, K), dtype=np.float32)
    out = np.empty((N, M), np.float32)
    tasks = [(np.matmul, x, W[s:e].T, out[:, s:e]) for s, e in split_range(M, cpu_threads())]
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            parallel(tasks)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * N * K * M / best


def copy_bandwidth():
    """Bytes/s of a 256 MB copy (read + write) cut over every CPU thread, best of 5."""
    from nanograd.fast.threads import cpu_threads, parallel, split_range
    a, b = np.ones(32 << 20, np.float32), np.empty(32 << 20, np.float32)
    tasks = [(np.copyto, b[s:e], a[s:e]) for s, e in split_range(a.size, cpu_threads())]
    best = np.inf
    for _ in range(5):
        t0 = time.perf_counter()
        parallel(tasks)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def floor_ms(cfg, vocab, bandwidth):
    from transformer.model import parameter_shapes
    N, C = cfg["batch_size"] * cfg["context_length"], cfg["d_model"]
    blocks, head = matmul_flops(cfg, vocab)
    n_params = sum(int(np.prod(s)) for s in parameter_shapes({**cfg, "max_token_value": vocab}).values())
    seconds = blocks / sgemm_rate(N, C, 4 * C) + head / sgemm_rate(N, C, vocab) + step_bytes(cfg, vocab, n_params) / bandwidth
    return 1000 * seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per child (a third of it for B*T*V > 1e7)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", help="only the sizes whose name contains this")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, cfg, vocab, steps, warmup = args.child
        return child(impl, json.loads(cfg), int(vocab), int(steps), int(warmup))
    bandwidth = copy_bandwidth()
    lines = [f"Machine: {machine()}", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| size | B, T, C, L, V | ours ms/step (IQR) | PyTorch ms/step (IQR) | ours / PyTorch "
             "| PyTorch 1 thread ms | ours / PyTorch 1 thread | floor ms | ours % of floor | PyTorch % of floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, cfg, vocab in sizes():
        if args.only and args.only not in name:
            continue
        big = cfg["batch_size"] * cfg["context_length"] * vocab > 1e7
        steps = max(5, args.steps // 3) if big else args.steps
        floor = floor_ms(cfg, vocab, bandwidth)  # before the children: measured after them, the char row's
        # rate came out at one core's in three sweeps of 2026-12-05 (42.8 ms against 25.5 alone)
        times = {"numpy": [], "torch": [], "torch1": []}
        for _ in range(ROUNDS):
            for impl in times:
                times[impl] += run_child(impl, cfg, vocab, steps, args.warmup)
        q = {impl: np.percentile(t, [25, 50, 75]) for impl, t in times.items()}
        ours, theirs, single = q["numpy"][1], q["torch"][1], q["torch1"][1]
        shape = (f"{cfg['batch_size']}, {cfg['context_length']}, {cfg['d_model']}, {cfg['num_blocks']}, "
                 f"{vocab:,}")
        row = (f"| {name} | {shape} | {ours:.1f} ({q['numpy'][0]:.1f}-{q['numpy'][2]:.1f}) "
               f"| {theirs:.1f} ({q['torch'][0]:.1f}-{q['torch'][2]:.1f}) | {ours / theirs:.2f} "
               f"| {single:.1f} | {ours / single:.2f} | {floor:.1f} | {floor / ours:.0%} | {floor / theirs:.0%} |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", f"Each side in processes of its own, {ROUNDS} alternating per side and size; medians over their "
              "timed steps.  ours / PyTorch < 1: ours is faster.  Floor: the step's matrix FLOPs at the sgemm rate "
              "measured on all cores for its shapes, plus its unavoidable bytes at the measured copy bandwidth "
              f"({bandwidth / 1e9:.1f} GB/s)."]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
