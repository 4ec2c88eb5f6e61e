"""One full training step, ours against the book's PyTorch model: the loss, every gradient, the parameters after AdamW.

    python benchmarks/gpu_step.py                       # CuPy against torch on CUDA: book config, V = 100,218
    python benchmarks/gpu_step.py --config small        # the same at V = 1,000 (gpu_check.sh's warm-up)
    python benchmarks/gpu_step.py --stand-in            # NumPy against torch on the CPU: the same code, no GPU

Both sides start from the same weights (our Model's init, copied into the book's
model, transformer/book_torch.py, with our position table) and see the same batch,
with dropout off (the two draw different masks).  For float32 and float64, and for
our two paths, FastModel with FastAdamW ("fused": the CUDA kernels on CuPy, what
train.py runs) and Model with AdamW ("plain"), a step is forward, backward and one
AdamW update at lr 1e-3 with torch's defaults (betas 0.9, 0.999, eps 1e-8, weight
decay 0.01); on torch, the book's zero_grad / backward / torch.optim.AdamW.step,
the update applied to our gradients.  The first AdamW step moves a parameter by
lr * g / (|g| + eps), which turns a rounding difference d in a gradient near 0 into
up to lr * d / eps: a sizeable part of a step in float32 however right both sides
are (6.5e-4 of lr with --stand-in on the small config when torch updates from its
own gradients, 1.5e-5 from ours).  Given the same gradients, the two updates must
agree to rounding.
TF32 is off on both sides (CUPY_TF32=0; torch's allow_tf32 flags False), so float32
matrix products are true float32.

The tolerances, each tensor against torch's:

  loss, gradients   max|ours - torch| / max|torch| <= 1e-4 (float32), 1e-10 (float64).
                    The same sums in another order: ~1e-6 and ~1e-14 of a tensor's
                    scale are expected (gpu_parity.py's reasoning); a wrong kernel is off
                    by O(1).
  parameters        max|ours - torch| / lr <= 2e-3 (float32), 1e-9 (float64): how far
                    from torch's each parameter lands, in units of the step's size.  The
                    embedding's entries reach ~5 (torch's N(0, 1) init), where float32's
                    spacing is 4.8e-7, i.e. 4.8e-4 of lr: a rounding apart is allowed
                    four times over (measured with --stand-in: 1.2e-4; float64: 2e-13).
                    A missing weight decay (0.01 lr p) moves a LayerNorm weight by 1e-2
                    of lr, a missing bias correction by O(1): both fail.

Prints one line per path and dtype (loss, worst gradient, worst parameter), then
`step: PASS` or `step: FAIL`; --out writes every tensor's row.  Exit status 0 when
every check passes, 1 when one fails, 2 when CuPy or torch's CUDA cannot run.
"""
import argparse
import os
import sys
import time

os.environ["CUPY_TF32"] = "0"  # read when CuPy is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.bench_cpu import BOOK, VOCAB  # noqa: E402
from benchmarks.bench_gpu import cupy_and_cuda_torch  # noqa: E402
from nanograd import AdamW  # noqa: E402
from nanograd.backend import to_host  # noqa: E402
from nanograd.fast import FastAdamW  # noqa: E402
from transformer.fast_model import FastModel  # noqa: E402
from transformer import Model, book_torch  # noqa: E402
from transformer.model import position_table  # noqa: E402

CONFIGS = {
    "book": dict(BOOK, dropout=0.0, max_token_value=VOCAB),
    "small": dict(d_model=32, num_blocks=2, num_heads=4, context_length=16, batch_size=3, dropout=0.0,
                  max_token_value=1000),
}
LR = 1e-3
GRAD_TOL = {"float32": 1e-4, "float64": 1e-10}  # of each tensor's largest entry (docstring)
PARAM_TOL = {"float32": 2e-3, "float64": 1e-9}  # of lr, the step's size (docstring)
PATHS = {"fused": (FastModel, FastAdamW), "plain": (Model, AdamW)}  # (model, optimizer) of each path


def our_step(h, backend, dtype, x, y, path):
    """(initial weights, loss, gradients, weights after one AdamW step), all on the host, of `path`."""
    model_class, optimizer_class = PATHS[path]
    model = model_class(h, backend=backend, dtype=dtype, seed=0)
    start = {name: np.array(to_host(p)) for name, p in model.params.items()}
    loss = model(x, y)[1]
    grads = model.backward()
    host_grads = {name: np.array(to_host(g)) for name, g in grads.items()}  # copies: the next backward reuses some
    optimizer_class(model.params, lr=LR).step(grads)
    return start, float(loss), host_grads, {name: np.array(to_host(p)) for name, p in model.params.items()}


def torch_step(torch, h, device, dtype, ours, x, y):
    """(loss, gradients, weights after one AdamW step) of the book's model from our initial weights;
    the step applies torch.optim.AdamW to our gradients (the docstring says why)."""
    start, _, our_grads, _ = ours
    pe = torch.from_numpy(position_table(h["context_length"], h["d_model"]))  # (T, C) float64, ours exactly
    model = book_torch.Model(h, position_table=pe).to(device=device, dtype=getattr(torch, dtype))
    book_torch.load_numpy_params(model, start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    # the book's step (book_torch.book_train_step), its gradients read between backward and the update
    _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.detach().cpu().numpy().copy() for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad.copy_(torch.from_numpy(our_grads[name]))
    optimizer.step()
    after = {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}
    return loss.item(), grads, after


def scale_error(ours, theirs, scale):
    """max|ours - theirs| / scale in float64; inf for a shape mismatch or a NaN anywhere."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max(initial=0.0) / scale)


def compare(dtype, path, ours, theirs):
    """Rows (dtype, path, tensor, error, tolerance, ok): the loss, each gradient, each parameter after the step."""
    _, loss, grads, after = ours
    t_loss, t_grads, t_after = theirs
    rows = [(dtype, path, "loss", scale_error(loss, t_loss, abs(t_loss)), GRAD_TOL[dtype])]
    if list(grads) != list(t_grads):
        rows.append((dtype, path, "gradient names", float("inf"), 0.0))
    for name, g in t_grads.items():
        rows.append((dtype, path, f"d {name}", scale_error(grads.get(name, np.nan), g, max(np.abs(g).max(), 1e-30)),
                     GRAD_TOL[dtype]))
    for name, p in t_after.items():
        rows.append((dtype, path, f"{name} after the step", scale_error(after.get(name, np.nan), p, LR),
                     PARAM_TOL[dtype]))
    return [(*row, bool(row[3] <= row[4])) for row in rows]  # NaN and inf fail


def summary(rows):
    """One line per (dtype, path): the loss's error, the worst gradient's and the worst parameter's."""
    lines = []
    for dtype in dict.fromkeys(r[0] for r in rows):
        for path in dict.fromkeys(r[1] for r in rows if r[0] == dtype):
            mine = [r for r in rows if r[0] == dtype and r[1] == path]
            parts = []
            for kind, keep in (("loss", lambda t: t == "loss"), ("gradient", lambda t: t.startswith("d ")),
                               ("parameter", lambda t: t.endswith("after the step"))):
                picked = [r for r in mine if keep(r[2])]
                worst = max(picked, key=lambda r: r[3] / r[4] if r[4] else (0 if r[3] == 0 else np.inf))
                which = "" if kind == "loss" else f" ({worst[2]}, worst of {len(picked)})"
                parts.append(f"{kind} {worst[3]:.1e}{which} tol {worst[4]:.0e}")
            ok = all(r[5] for r in mine)
            lines.append(f"  {'ok' if ok else 'FAIL'}: {dtype} {path}: " + "; ".join(parts))
    return lines


def table(rows, title):
    lines = [f"# {title}", "", "| dtype | path | tensor | error | tolerance | result |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} | {r[4]:.0e} | {'PASS' if r[5] else 'FAIL'} |" for r in rows]
    return "\n".join(lines) + "\n"


def run(torch, backend, device, config, dtypes=("float32", "float64")):
    """Every row of the comparison, printing each path's summary as it goes."""
    h = dict(CONFIGS[config])
    B, T, V = h.pop("batch_size"), h["context_length"], h["max_token_value"]
    rng = np.random.default_rng(1234)
    x = rng.integers(0, V, size=(B, T))  # (B, T)
    y = rng.integers(0, V, size=(B, T))  # (B, T)
    x[0, :4] = 7  # repeated ids: the embedding gradient must add them up
    rows = []
    for dtype in dtypes:
        for path in PATHS:
            t0 = time.perf_counter()
            ours = our_step(h, backend, dtype, x, y, path)
            theirs = torch_step(torch, h, device, dtype, ours, x, y)
            mine = compare(dtype, path, ours, theirs)
            rows += mine
            print(summary(mine)[0] + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="book")
    parser.add_argument("--stand-in", action="store_true",
                        help="NumPy against torch on the CPU: the same comparison on a machine without a GPU")
    parser.add_argument("--out", help="write every tensor's row here (markdown)")
    args = parser.parse_args(argv)
    if args.stand_in:
        import torch
        backend, device = "numpy", "cpu"
    else:
        backend, device = "cupy", "cuda"
        if cupy_and_cuda_torch()[0] is None:
            return 2
        import torch  # (made ready, TF32 off, by cupy_and_cuda_torch)
    h = CONFIGS[args.config]
    title = (f"One training step, {backend} against torch on {device}: config {args.config} (B={h['batch_size']} "
             f"T={h['context_length']} C={h['d_model']} L={h['num_blocks']} H={h['num_heads']} "
             f"V={h['max_token_value']:,}, dropout 0), AdamW lr {LR:g}")
    print(f"{title}; CUPY_TF32={os.environ.get('CUPY_TF32')}, torch allow_tf32="
          f"{torch.backends.cuda.matmul.allow_tf32}", flush=True)
    t0 = time.perf_counter()
    rows = run(torch, backend, device, args.config)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table(rows, title))
    failed = [r for r in rows if not r[5]]
    for r in failed:
        print(f"FAIL: {r[0]} {r[1]} {r[2]}: {r[3]:.2e} > {r[4]:.0e}")
    print(f"step: {'PASS' if not failed else 'FAIL'} ({len(rows) - len(failed)} of {len(rows)} checks within "
          f"tolerance, {time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
