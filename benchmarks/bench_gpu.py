"""GPU training-step benchmark: our CuPy step against the book's PyTorch model on CUDA (eager).

    python benchmarks/bench_gpu.py                        # the book config and a larger one
    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.md --steps 100

One process, one GPU, the same weights (ours copied into torch) and the same
batches (already on the device) for every implementation; they take turns
step by step after a warm-up, in a rotating order.  A step is forward +
backward + AdamW with dropout on (PyTorch: the book's zero_grad / backward /
step with torch.optim.AdamW's default, on CUDA the multi-tensor one), and
ends with the loss as a Python float, which waits for the GPU; the device is
also synchronized before and after every timed step.  TF32 is off in both
(CUPY_TF32=0; torch's allow_tf32 flags False): true float32 matrix products.

    cupy-fused   FastModel and FastAdamW: the CUDA kernels (nanograd/fast/cuda_kernels.py), what train.py runs
    cupy-plain   Model and AdamW: the plain xp kernels only (what train.py --reference runs)
    torch        the book's model (transformer/book_torch.py), eager

Prints a markdown table: median ms/step with the 10th-90th percentile,
tokens/s, torch's median over each, and the floor, matmul FLOPs over the
measured sgemm rate plus the bytes a step must move over the measured copy
bandwidth.  Before timing, each config checks that both models give the same
eval loss on the same batch (to LOSS_RTOL).  Exit status: 0 when every config
ran and passed that check, 1 when one crashed or failed it, 2 when CuPy or
torch's CUDA cannot run.
"""
import argparse
import os
import sys
import time

os.environ["CUPY_TF32"] = "0"  # read when CuPy is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.bench_cpu import BOOK, VOCAB, matmul_flops, step_bytes  # noqa: E402

CONFIGS = {
    "book": dict(BOOK),
    "large": dict(d_model=512, num_blocks=12, num_heads=8, context_length=256, batch_size=16, dropout=0.1),
}
IMPLS = ("cupy-fused", "cupy-plain", "torch")
# Both models compute the same float32 loss from the same weights and batch, each
# through ~40 matrix products summed in its own order: they agree to ~1e-6 of
# the loss, and a wrong kernel is off by far more than LOSS_RTOL (as gpu_parity.py's
# float32 tolerance).
LOSS_RTOL = 1e-4


def label(name, cfg, vocab):
    return (f"{name}: B={cfg['batch_size']} T={cfg['context_length']} C={cfg['d_model']} "
            f"L={cfg['num_blocks']} H={cfg['num_heads']} V={vocab:,}")


def measure_rates(cp, cfg, vocab, sync):
    """(sgemm FLOP/s on the output layer's shape, device copy bytes/s), medians of 10 after warm-up."""
    N = cfg["batch_size"] * cfg["context_length"]
    x = cp.random.standard_normal((N, cfg["d_model"]), dtype=np.float32)
    W = cp.random.standard_normal((vocab, cfg["d_model"]), dtype=np.float32)
    a = cp.random.standard_normal(256 << 20 >> 2, dtype=np.float32)  # 256 MB, far past the L2 cache
    b = cp.empty_like(a)

    def median_seconds(fn):
        fn()
        ts = []
        for _ in range(10):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
    rate = 2 * N * cfg["d_model"] * vocab / median_seconds(lambda: x @ W.T)
    bandwidth = 2 * a.nbytes / median_seconds(lambda: cp.copyto(b, a))
    return rate, bandwidth


def loss_check(name, ours, theirs):
    """(whether our loss is within LOSS_RTOL of torch's, the line that says so); a NaN fails."""
    rel = abs(ours - theirs) / abs(theirs)
    ok = bool(rel <= LOSS_RTOL)  # False for a NaN
    return ok, (f"loss check: {name}: {'PASS' if ok else 'FAIL'}, eval loss on batch 0, ours {ours:.6f}, "
                f"torch {theirs:.6f} (rel diff {rel:.1e}, tolerance {LOSS_RTOL:.0e})")


def bench_config(cp, torch, name, cfg, vocab, steps, warmup, sync):
    """{impl: list of step times in ms}, and whether both of our models compute torch's loss (with the lines saying so)."""
    from nanograd import AdamW
    from nanograd.backend import to_host
    from nanograd.fast import FastAdamW
    from transformer.fast_model import FastModel
    from transformer import Model, book_torch

    h = {**{k: v for k, v in cfg.items() if k != "batch_size"}, "max_token_value": vocab}
    model = Model(h, backend="cupy", dtype="float32", seed=0)
    fast = FastModel(h, backend="cupy", dtype="float32", seed=0)  # the same weights
    opt = AdamW(model.params, lr=1e-3)
    fast_opt = FastAdamW(fast.params, lr=1e-3)
    tmodel = book_torch.Model(h).cuda()
    book_torch.load_numpy_params(tmodel, {k: to_host(v) for k, v in model.params.items()})
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-3)

    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], cfg["context_length"])
    host = [(rng.integers(0, vocab, shape), rng.integers(0, vocab, shape)) for _ in range(8)]
    ours = [(cp.asarray(x), cp.asarray(y)) for x, y in host]
    theirs = [(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()) for x, y in host]

    # the same function of the same weights: eval-mode losses on the first batch, both of ours against torch's
    tmodel.eval()
    with torch.no_grad():
        loss_t = tmodel(*theirs[0])[1].item()
    tmodel.train()
    checks = []
    for label_, m in (("cupy-fused", fast), ("cupy-plain", model)):
        loss_o = m.eval()(*ours[0])[1]
        m.train()
        checks.append(loss_check(f"{name} {label_}", loss_o, loss_t))
    ok, check = all(c[0] for c in checks), "\n".join(c[1] for c in checks)

    def ours_step(m, o):
        def step(i):
            x, y = ours[i % len(ours)]
            m(x, y)
            o.step(m.backward())
        return step

    def torch_step(i):
        x, y = theirs[i % len(theirs)]
        book_torch.book_train_step(tmodel, topt, x, y)

    run = {"cupy-fused": ours_step(fast, fast_opt), "cupy-plain": ours_step(model, opt), "torch": torch_step}
    times = {impl: [] for impl in IMPLS}
    for i in range(warmup + steps):
        order = IMPLS[i % len(IMPLS):] + IMPLS[:i % len(IMPLS)]
        for impl in order:
            sync()
            t0 = time.perf_counter()
            run[impl](i)
            sync()
            if i >= warmup:
                times[impl].append(1000 * (time.perf_counter() - t0))
    memory = {"cupy": cp.get_default_memory_pool().total_bytes() / 2**20,
              "torch": torch.cuda.max_memory_allocated() / 2**20}
    del model, opt, fast, fast_opt, tmodel, topt
    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return times, (ok, check), memory  # ({impl: ms list}, loss_check(...), {"cupy"/"torch": MB})


def run_configs(cp, torch, names, args, lines, sync):
    """Benchmark each named config, printing rows and appending them to lines.  Returns
    (the loss-check lines, the failures: a config that crashed or whose losses disagree)."""
    from transformer.model import parameter_shapes
    checks, failures = [], []
    for name in names:
        cfg = CONFIGS[name]
        tokens = cfg["batch_size"] * cfg["context_length"]
        big = tokens > 1024
        steps, warmup = (max(10, args.steps // 4), max(3, args.warmup // 3)) if big else (args.steps, args.warmup)
        try:
            times, (ok, check), memory = bench_config(cp, torch, name, cfg, args.vocab, steps, warmup, sync)
            rate, bandwidth = measure_rates(cp, cfg, args.vocab, sync)
        except Exception as e:  # e.g. out of memory: report it, go on to the next config, exit 1 at the end
            row = f"| {label(name, cfg, args.vocab)} | failed | {type(e).__name__}: {e} | | | | | |"
            lines.append(row)
            print(row, flush=True)
            failures.append(f"{name} crashed ({type(e).__name__}: {e})")
            continue
        checks.append(check)
        if not ok:
            failures.append(f"{name}'s losses disagree")
        n_params = sum(int(np.prod(s)) for s in parameter_shapes({**cfg, "max_token_value": args.vocab}).values())
        floor_ms = 1000 * (matmul_flops(cfg, args.vocab) / rate + step_bytes(cfg, args.vocab, n_params) / bandwidth)
        torch_ms = float(np.median(times["torch"]))
        for impl in IMPLS:
            p10, p50, p90 = np.percentile(times[impl], [10, 50, 90])
            mem = memory["torch" if impl == "torch" else "cupy"]
            row = (f"| {label(name, cfg, args.vocab)} | {impl} | {p50:.2f} ({p10:.2f}-{p90:.2f}) "
                   f"| {1000 * tokens / p50:,.0f} | {torch_ms / p50:.2f} | {floor_ms:.2f} | {floor_ms / p50:.0%} "
                   f"| {mem:,.0f} |")
            lines.append(row)
            print(row, flush=True)
        print(f"  ({len(times['torch'])} timed steps each after {warmup} warm-up; sgemm {rate / 1e12:.1f} TFLOP/s, "
              f"copy {bandwidth / 1e9:,.0f} GB/s)", flush=True)
    return checks, failures


def cupy_and_cuda_torch():
    """(cupy, torch) with TF32 off on both sides, ready to compare on the GPU; or (None, None)
    after one line on stderr saying which of the two cannot run here."""
    from nanograd.backend import BackendError, get_backend
    try:
        cp = get_backend("cupy")
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, None
    import torch
    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; the comparison needs PyTorch built with CUDA.", file=sys.stderr)
        return None, None
    torch.backends.cuda.matmul.allow_tf32 = False  # (CuPy's TF32 is off unless CUPY_TF32 is set)
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return cp, torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="book,large", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps per implementation (book config)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    unknown = [name for name in args.configs.split(",") if name not in CONFIGS]
    if unknown:
        print(f"error: unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}.", file=sys.stderr)
        return 2

    cp, torch = cupy_and_cuda_torch()
    if cp is None:
        return 2

    def sync():
        cp.cuda.runtime.deviceSynchronize()  # the whole device: CuPy's and torch's streams alike

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    lines = [f"GPU: {gpu}; CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver "
             f"{cp.cuda.runtime.driverGetVersion()}; cupy {cp.__version__}, torch {torch.__version__}, "
             f"numpy {np.__version__}",
             f"TF32: CUPY_TF32={os.environ.get('CUPY_TF32')}, torch matmul allow_tf32="
             f"{torch.backends.cuda.matmul.allow_tf32}, cudnn allow_tf32={torch.backends.cudnn.allow_tf32}",
             f"Date: {time.strftime('%Y-%m-%d')}", "",
             "| config | implementation | ms/step, median (p10-p90) | tokens/s | torch / this "
             "| floor ms | floor reached | GPU memory MB |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    checks, failures = run_configs(cp, torch, args.configs.split(","), args, lines, sync)
    lines += ["", "torch / this = torch's median over this row's median: above 1, this row is faster than torch. "
              "Floor = matmul FLOPs / measured sgemm rate on the output layer's shape + unavoidable bytes / "
              "measured copy bandwidth. GPU memory: CuPy's pool (shared by both cupy rows) and torch's peak "
              "allocation.", ""] + checks
    print("\n".join(checks), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print(f"bench: {'FAIL: ' + '; '.join(failures) if failures else 'PASS'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
