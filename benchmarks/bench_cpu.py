"""CPU training-step benchmark: our NumPy step against the book's PyTorch model.

    python benchmarks/bench_cpu.py                      # book config + sweep, ~10 min on 2 cores
    python benchmarks/bench_cpu.py --quick              # book config only
    python benchmarks/bench_cpu.py --out benchmarks/results/cpu.md

One process, the same batches for both, alternating NumPy and PyTorch step
by step after a warm-up, so both see the same machine state.  A step is
forward + backward + AdamW (PyTorch: the book's zero_grad / backward / step).
Peak memory is measured separately, in a fresh child process per
implementation and config (peak resident set size minus the size after imports
and data), since one process cannot separate two libraries' peaks.
The floor: matmul FLOPs per step over the measured rate of the output
layer's matmul, plus the bytes a step must move over the measured copy bandwidth.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

# nanograd splits its big kernels over the CPU cores itself; a BLAS that also ran threads
# would fight it for the same cores (and its idle threads spin).  Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BOOK = dict(d_model=80, num_blocks=6, num_heads=4, context_length=128, batch_size=2, dropout=0.1)
VOCAB = 100_218  # max token id + 1 of the default corpus (cl100k_base ids)
COMPACT_VOCAB = 12_688  # distinct ids of the default corpus: train.py --compact-vocab


def sweep_configs(vocab):
    """(config, vocabulary): the book's, then one setting changed at a time, then --compact-vocab."""
    configs = [dict(BOOK)]
    configs += [dict(BOOK, batch_size=b) for b in (8, 32)]
    configs += [dict(BOOK, context_length=512)]
    configs += [dict(BOOK, d_model=d) for d in (256, 512)]
    return [(cfg, vocab) for cfg in configs] + [(dict(BOOK), COMPACT_VOCAB)]


def label(cfg, vocab):
    return (f"B={cfg['batch_size']} T={cfg['context_length']} C={cfg['d_model']} "
            f"L={cfg['num_blocks']} V={vocab:,}")


def batches(cfg, vocab, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg["batch_size"], cfg["context_length"])
    return [(rng.integers(0, vocab, shape), rng.integers(0, vocab, shape)) for _ in range(n)]


def make_numpy(cfg, vocab):
    from nanograd.fast import FastAdamW
    from nanograd.fast.memory import keep_freed_memory
    from transformer.fast_model import FastModel
    keep_freed_memory()  # as train.py
    model = FastModel({**cfg, "max_token_value": vocab}, dtype="float32", seed=0)  # as train.py trains
    opt = FastAdamW(model.params, lr=1e-3)
    model.head_ready = opt.start  # as train.py: AdamW begins on the output layer mid-backward

    def step(x, y):
        loss = model(x, y)[1]
        opt.step(model.backward())
        return loss
    return model, step


def make_torch(cfg, vocab, params):
    import torch
    from transformer import book_torch
    model = book_torch.Model({**cfg, "max_token_value": vocab})
    book_torch.load_numpy_params(model, params)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        return book_torch.book_train_step(model, opt, torch.from_numpy(x), torch.from_numpy(y))
    return model, step


def time_pair(cfg, vocab, steps, warmup):
    """Median and quartiles (ms) of alternating NumPy and PyTorch steps on the same batches."""
    from nanograd.backend import to_host
    model, np_step = make_numpy(cfg, vocab)
    _, torch_step = make_torch(cfg, vocab, {k: to_host(v) for k, v in model.params.items()})
    data = batches(cfg, vocab, warmup + steps)
    times = {"numpy": [], "torch": []}
    for i, (x, y) in enumerate(data):
        for name, step in (("numpy", np_step), ("torch", torch_step)):
            t0 = time.perf_counter()
            step(x, y)
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: np.percentile(t, [25, 50, 75]).tolist() for name, t in times.items()}


def peak_memory(impl, cfg, vocab):
    """Peak RSS growth (MB) over 3 steps, measured in a fresh child process."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", impl,
                          json.dumps(cfg), "--vocab", str(vocab)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(impl, cfg, vocab):
    """Run in the child: print peak RSS (MB) minus RSS after imports and data."""
    import torch  # noqa: F401  imported by both, so both baselines include it
    from transformer.model import init_params

    def rss_mb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))
    data = batches(cfg, vocab, 3)
    base = rss_mb("VmRSS")
    if impl == "numpy":
        _, step = make_numpy(cfg, vocab)
    else:
        params = init_params({**cfg, "max_token_value": vocab})
        _, step = make_torch(cfg, vocab, {k: v.astype(np.float32) for k, v in params.items()})
        del params
    for x, y in data:
        step(x, y)
    print(rss_mb("VmHWM") - base)


def matmul_flops(cfg, vocab):
    """Matmul FLOPs of one training step (forward 2mnk per product, backward twice that)."""
    N, T, C, L = cfg["batch_size"] * cfg["context_length"], cfg["context_length"], cfg["d_model"], cfg["num_blocks"]
    linear = 2 * N * C * (3 * C + C + 4 * C + 4 * C) * L + 2 * N * C * vocab  # q,k,v, proj, ffn, head
    attention = 2 * 2 * cfg["batch_size"] * T * T * C * L  # q @ k.T and att @ v, all heads
    return 3 * (linear + attention)


def step_bytes(cfg, vocab, n_params):
    """Bytes a step cannot avoid moving: AdamW reads p, g, m, v and writes p, m, v; the
    logits are written, read by the loss, rewritten as dlogits and read by two matmuls."""
    N = cfg["batch_size"] * cfg["context_length"]
    return 4 * (7 * n_params + 5 * N * vocab)


def measure_rates(cfg, vocab):
    """(matmul FLOP/s on the output layer's shape, copy bytes/s), each on all CPU threads.

    BLAS runs single-threaded here, as in train.py, so each thread takes a
    share of the vocabulary (of the bytes), as nanograd's kernels do.
    """
    from nanograd.fast.threads import cpu_threads, parallel, split_range
    rng = np.random.default_rng(0)
    N, threads = cfg["batch_size"] * cfg["context_length"], cpu_threads()
    x = rng.standard_normal((N, cfg["d_model"]), dtype=np.float32)
    W = rng.standard_normal((vocab, cfg["d_model"]), dtype=np.float32)
    out = np.empty((N, vocab), np.float32)
    a, b = np.ones(64 << 20, np.float32), np.empty(64 << 20, np.float32)

    def median_seconds(tasks):
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            parallel(tasks)
            ts.append(time.perf_counter() - t0)
        return np.median(ts)
    product = median_seconds([(np.matmul, x, W[s:e].T, out[:, s:e]) for s, e in split_range(vocab, threads)])
    copy = median_seconds([(np.copyto, b[s:e], a[s:e]) for s, e in split_range(a.size, threads)])
    return 2 * N * cfg["d_model"] * vocab / product, 2 * a.nbytes / copy


def machine():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from nanograd.fast.threads import cpu_threads
    return (f"{cpu}, {cpu_threads()} cores; Python {platform.python_version()}, numpy {np.__version__}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the book config only")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], json.loads(args.memory_child[1]), args.vocab)
    from transformer.model import parameter_shapes

    lines = [f"Machine: {machine()}", f"Date: {time.strftime('%Y-%m-%d')}", "",
             "| config | NumPy ms/step (IQR) | PyTorch ms/step (IQR) | ratio | NumPy tok/s | PyTorch tok/s "
             "| floor ms | floor reached | NumPy peak MB | PyTorch peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for cfg, vocab in [(dict(BOOK), args.vocab)] if args.quick else sweep_configs(args.vocab):
        steps = args.steps if cfg["batch_size"] * cfg["context_length"] <= 1024 else max(5, args.steps // 3)
        t = time_pair(cfg, vocab, steps, args.warmup)
        np_ms, torch_ms = t["numpy"][1], t["torch"][1]
        tokens = cfg["batch_size"] * cfg["context_length"]
        n_params = sum(int(np.prod(s)) for s in parameter_shapes({**cfg, "max_token_value": vocab}).values())
        rate, bandwidth = measure_rates(cfg, vocab)
        floor_ms = 1000 * (matmul_flops(cfg, vocab) / rate + step_bytes(cfg, vocab, n_params) / bandwidth)
        mem = ("-", "-") if args.no_memory else (f"{peak_memory('numpy', cfg, vocab):,.0f}",
                                                 f"{peak_memory('torch', cfg, vocab):,.0f}")
        row = (f"| {label(cfg, vocab)} | {np_ms:.1f} ({t['numpy'][0]:.1f}-{t['numpy'][2]:.1f}) "
               f"| {torch_ms:.1f} ({t['torch'][0]:.1f}-{t['torch'][2]:.1f}) | {np_ms / torch_ms:.2f} "
               f"| {1000 * tokens / np_ms:,.0f} | {1000 * tokens / torch_ms:,.0f} | {floor_ms:.1f} "
               f"| {floor_ms / np_ms:.0%} | {mem[0]} | {mem[1]} |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", "ratio = NumPy median / PyTorch median (lower is better). Floor = matmul FLOPs / "
              "(measured output-layer sgemm rate) + unavoidable bytes / (measured copy bandwidth)."]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
