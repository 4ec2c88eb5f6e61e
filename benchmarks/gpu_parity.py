"""CuPy against NumPy on the same weights and batch: logits, loss, every gradient, AdamW steps.

    python benchmarks/gpu_parity.py [--config book|small] [--out parity.md]

Both models start from the same host-drawn weights (Model's init_params) and
see the same batch; dropout is off, since the two backends draw different
masks.  For float32 and float64, on CuPy both FastModel with FastAdamW (the
CUDA kernels, "fused") and Model with AdamW (the plain xp code, "plain"), it
prints each tensor's error relative to its scale, max|cupy - numpy| / max|numpy|,
against the tolerance below, then runs two AdamW steps on each and compares
the losses (and, in float64, the parameters).  Exit status 0 when every
check passes, 1 when one fails, 2 when CuPy cannot run.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("CUPY_TF32", "0")  # read when CuPy is imported: keep matmuls in true float32
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from nanograd import AdamW  # noqa: E402
from nanograd.backend import BackendError, get_backend, to_host  # noqa: E402
from nanograd.fast import FastAdamW  # noqa: E402
from transformer.fast_model import FastModel  # noqa: E402
from transformer import Model  # noqa: E402

# Scale-relative tolerances.  float32 rounds to 6e-8; a logit or gradient of the
# book's model passes through ~40 matrix products (reductions of up to B*T*4C
# terms), LayerNorms and softmaxes, each rounded in another order on the GPU
# (cuBLAS) than on the CPU (OpenBLAS), so ~1e-6 of a tensor's scale is expected
# and 1e-4 leaves a wide margin while a wrong kernel (errors of O(1)) fails by
# far.  float64 the same with 1e-16: 1e-10.
TOL = {"float32": 1e-4, "float64": 1e-10}
ADAMW_STEPS = 2
CONFIGS = {
    "book": dict(d_model=80, num_blocks=6, num_heads=4, context_length=128, batch_size=2,
                 max_token_value=100_218),
    "small": dict(d_model=32, num_blocks=2, num_heads=4, context_length=16, batch_size=3,
                  max_token_value=1000),
}


def rel_err(a, b):
    """max|a - b| / max|b|, both as float64 on the host (NaN anywhere: inf)."""
    a, b = np.asarray(to_host(a), dtype=np.float64), np.asarray(to_host(b), dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30))


def forward_backward(h, backend_name, dtype, x, y, fast=False):
    """A fresh model (seed 0; FastModel if fast) and its logits, loss and gradients, copied to
    the host (the model reuses some gradient buffers from one backward to the next).
    FastModel's forward with targets makes no logits, so they come from a forward without."""
    model = (FastModel if fast else Model)(h, backend=backend_name, dtype=dtype, seed=0)
    logits = model(x)[0]  # (B, T, V)
    loss = model(x, y)[1]
    grads = {name: np.array(to_host(g)) for name, g in model.backward().items()}
    return model, np.array(to_host(logits)), loss, grads


def adamw_losses(model, x, y, fast=False):
    """Loss before each of ADAMW_STEPS AdamW (FastAdamW if fast) steps and after the last;
    the model is trained in place."""
    opt = (FastAdamW if fast else AdamW)(model.params, lr=1e-3)
    losses = []
    for _ in range(ADAMW_STEPS):
        losses.append(model(x, y)[1])
        opt.step(model.backward())
    losses.append(model(x, y)[1])
    return losses


def check(rows, dtype, kernels, tensor, err, tol):
    rows.append((dtype, kernels, tensor, err, tol, "PASS" if err <= tol else "FAIL"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="book")
    parser.add_argument("--out", default=None, help="write the full per-tensor table here (markdown)")
    args = parser.parse_args(argv)
    try:
        cp = get_backend("cupy")
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h = dict(CONFIGS[args.config], dropout=0.0)
    B, T = h.pop("batch_size"), h["context_length"]
    rng = np.random.default_rng(1234)
    x = rng.integers(0, h["max_token_value"], size=(B, T))  # (B, T)
    y = rng.integers(0, h["max_token_value"], size=(B, T))  # (B, T)
    x[0, :4] = 7  # repeated ids: the embedding gradient must accumulate them
    print(f"parity: config {args.config} {h}, batch {B}x{T}, CUPY_TF32={os.environ.get('CUPY_TF32')}")

    rows = []
    for dtype in ("float32", "float64"):
        t0 = time.perf_counter()
        ref_model, ref_logits, ref_loss, ref_grads = forward_backward(h, "numpy", dtype, x, y)
        ref_start = {n: p.copy() for n, p in ref_model.params.items()}
        ref_losses = adamw_losses(ref_model, x, y)
        print(f"  numpy {dtype}: loss {ref_loss:.6f} ({time.perf_counter() - t0:.1f} s)", flush=True)
        for kernels, fast in (("fused", True), ("plain", False)):
            t0 = time.perf_counter()
            model, logits, loss, grads = forward_backward(h, "cupy", dtype, x, y, fast)
            same_start = all(np.array_equal(to_host(model.params[n]), p) for n, p in ref_start.items())
            check(rows, dtype, kernels, "initial weights (bitwise)", 0.0 if same_start else float("inf"), 0.0)
            check(rows, dtype, kernels, "logits", rel_err(logits, ref_logits), TOL[dtype])
            check(rows, dtype, kernels, "loss", rel_err(loss, ref_loss), TOL[dtype])
            for name in ref_grads:
                check(rows, dtype, kernels, f"d {name}", rel_err(grads[name], ref_grads[name]), TOL[dtype])
            losses = adamw_losses(model, x, y, fast)
            check(rows, dtype, kernels, f"losses over {ADAMW_STEPS} AdamW steps",
                  rel_err(np.array(losses), np.array(ref_losses)), TOL[dtype])
            if dtype == "float64":  # (float32 gradients that are pure rounding noise can flip a step's sign)
                check(rows, dtype, kernels, f"params after {ADAMW_STEPS} AdamW steps",
                      max(rel_err(model.params[n], ref_model.params[n]) for n in ref_model.params), TOL[dtype])
            print(f"  cupy  {dtype} {kernels}: loss {loss:.6f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    print()
    print("| dtype | kernels | worst tensor | max rel err | tol | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in ("float32", "float64"):
        for kernels in ("fused", "plain"):
            mine = [r for r in rows if r[0] == dtype and r[1] == kernels]
            for tensor in ("logits", "loss"):
                r = next(r for r in mine if r[2] == tensor)
                print(f"| {dtype} | {kernels} | {tensor} | {r[3]:.2e} | {r[4]:.0e} | {r[5]} |")
            worst = max((r for r in mine if r[2].startswith("d ")), key=lambda r: r[3] / r[4])
            print(f"| {dtype} | {kernels} | {worst[2]} (worst of {sum(r[2].startswith('d ') for r in mine)} "
                  f"gradients) | {worst[3]:.2e} | {worst[4]:.0e} | {worst[5]} |")
            for r in mine:
                if not r[2].startswith("d ") and r[2] not in ("logits", "loss"):
                    print(f"| {dtype} | {kernels} | {r[2]} | {r[3]:.2e} | {r[4]:.0e} | {r[5]} |")
    failed = [r for r in rows if r[5] != "PASS"]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"# CuPy against NumPy, config {args.config}\n\n")
            f.write("| dtype | kernels | tensor | max rel err | tol | result |\n")
            f.write("| --- | --- | --- | --- | --- | --- |\n")
            for r in rows:
                f.write(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} | {r[4]:.0e} | {r[5]} |\n")
    for r in failed:
        print(f"FAIL: {r[0]} {r[1]} {r[2]}: {r[3]:.2e} > {r[4]:.0e}")
    print(f"\nparity: {'PASS' if not failed else 'FAIL'} ({len(rows) - len(failed)} of {len(rows)} checks "
          f"within tolerance: float32 {TOL['float32']:.0e}, float64 {TOL['float64']:.0e} of each tensor's scale)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
