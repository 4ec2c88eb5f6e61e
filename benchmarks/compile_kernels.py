"""Compile every CUDA kernel of the project with NVRTC; with --launch, also run each once on a GPU.

    python benchmarks/compile_kernels.py            # no GPU needed (CI): NVRTC compiles to SASS
    python benchmarks/compile_kernels.py --launch   # on a GPU (gpu_check.sh's second phase)

Without --launch nothing touches a device: each CUDA source (the fused kernels'
for float and for double, the AdamW kernel, the counter generator's) goes
through NVRTC, front end and ptxas, for each architecture in ARCHS, and every
kernel name the Python side launches must come out of it.  NVRTC is CuPy's own
binding (cupy_backends.cuda.libs.nvrtc) on the NVRTC library of the
nvidia-cuda-nvrtc-cu12 wheel (CUDA 12) or the nvidia-cuda-nvrtc 13 wheel (CUDA 13;
.ci/run compiles with both); CuPy's compile_using_nvrtc asks the CUDA runtime for
the current device even when given an architecture, so it cannot be used without one.

With --launch, each kernel runs once on tiny inputs in float and double, and
its result is compared with the plain NumPy kernel's.  Exit status: 0 when all
compiled (and agreed), 1 when one did not, 2 when CuPy or NVRTC is missing.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

ARCHS = ("sm_80", "sm_90")  # A100; H100 and H200
# --launch's agreement with NumPy, relative to each tensor's largest entry: the
# same formulas summed in another order, as tests/test_cuda_kernels.py's TOL.
LAUNCH_TOL = {"float32": 1e-5, "float64": 1e-12}


def compile_units():
    """(label, CUDA source, NVRTC options, names the Python side launches) for every source."""
    from nanograd.fast import counter_rng
    from nanograd.fast import cuda_kernels
    return cuda_kernels.compile_units() + [
        ("counter_rng", counter_rng.SOURCE, (), counter_rng.KERNELS)]


def compile_one(nvrtc, label, source, options, names, arch):
    """NVRTC source -> SASS for arch; an error string, or None when it compiled with every name."""
    prog = nvrtc.createProgram(source, f"{label}.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except Exception as e:
            return f"{label} for {arch} does not compile ({e}):\n{nvrtc.getProgramLog(prog)}"
        cubin = nvrtc.getCUBIN(prog)
        missing = [name for name in names if nvrtc.getLoweredName(prog, name) != name]
        if missing or not cubin:
            return f"{label} for {arch}: no extern \"C\" kernel named {', '.join(missing)}"
        return None
    finally:
        nvrtc.destroyProgram(prog)


def compile_all():
    """Compile every unit for every arch; returns the number of failures (printed)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        version = nvrtc.getVersion()
    except Exception as e:  # no CuPy, or no NVRTC library beside it
        print(f"error: NVRTC cannot be loaded ({type(e).__name__}: {e}); "
              "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 (or cupy-cuda13x nvidia-cuda-nvrtc)", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    units, failures = compile_units(), 0
    for label, source, options, names in units:
        for arch in ARCHS:
            error = compile_one(nvrtc, label, source, options, names, arch)
            if error:
                failures += 1
                print(f"FAIL: {error}")
            else:
                print(f"ok: {label} for {arch}: {len(names)} kernels ({', '.join(names)})")
    print(f"compile: {'PASS' if not failures else 'FAIL'}, {len(units)} sources x {len(ARCHS)} architectures "
          f"with NVRTC {version[0]}.{version[1]} in {time.perf_counter() - t0:.1f} s, {failures} failed")
    return failures


def agree(name, got, want, dtype, failures):
    """Record whether the device result got matches the NumPy one within LAUNCH_TOL of its scale."""
    from nanograd.backend import to_host
    got, want = np.asarray(to_host(got), dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    err = np.abs(got - want).max(initial=0.0) / scale if got.shape == want.shape else np.inf
    ok = bool(err <= LAUNCH_TOL[dtype])  # False for NaN
    print(f"{'ok' if ok else 'FAIL'}: {name} {dtype}: max error {err:.1e} of its scale")
    if not ok:
        failures.append(f"{name} {dtype}")


def launch_all(cp):
    """Run each CUDA kernel once per dtype on tiny inputs against NumPy; returns the failures."""
    from nanograd.fast import counter_rng
    from nanograd.fast import cuda_kernels as ck
    from nanograd.adamw import adamw_update
    from nanograd.attention import causal_softmax_backward, causal_softmax_forward
    from nanograd.cross_entropy import cross_entropy_backward, cross_entropy_forward
    from nanograd.layernorm import layernorm_backward, layernorm_forward
    failures = []
    for dtype in ("float32", "float64"):
        rng = np.random.default_rng(0)
        x, dout = (rng.standard_normal((3, 5, 40)).astype(dtype) for _ in range(2))  # (B, T, C)
        w, b = 1 + rng.standard_normal(40).astype(dtype), rng.standard_normal(40).astype(dtype)  # (C,)
        out, cache = layernorm_forward(x, w, b)
        grads = layernorm_backward(dout, cache)
        out_d, cache_d = ck.layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5)
        agree("layernorm_forward", out_d, out, dtype, failures)
        for name, g_d, g in zip(("dx", "dw", "db"), ck.layernorm_backward(cp.asarray(dout), cache_d), grads):
            agree(f"layernorm_backward {name}", g_d, g, dtype, failures)

        preatt, datt = (rng.standard_normal((2, 3, 9, 9)).astype(dtype) for _ in range(2))  # (B, NH, T, T)
        att = causal_softmax_forward(preatt)
        att_d = ck.causal_softmax_forward(cp.asarray(preatt))
        agree("causal_softmax_forward", att_d, att, dtype, failures)
        agree("causal_softmax_backward", ck.causal_softmax_backward(cp.asarray(datt), att_d),
              causal_softmax_backward(datt, att), dtype, failures)

        logits = (3 * rng.standard_normal((6, 50))).astype(dtype)  # (N, V)
        targets = np.array([0, 49, 3, 3, 17, 8])  # (N,) a repeat on purpose
        loss, ce = cross_entropy_forward(logits, targets)
        loss_d, ce_d = ck.cross_entropy_forward(cp.asarray(logits), cp.asarray(targets))
        agree("cross_entropy_forward loss", loss_d, loss, dtype, failures)
        agree("cross_entropy_backward", ck.cross_entropy_backward(1.0, ce_d),
              cross_entropy_backward(1.0, ce), dtype, failures)

        p, g = rng.standard_normal(300).astype(dtype), rng.standard_normal(300).astype(dtype)  # (n,)
        m, v = np.zeros_like(p), np.zeros_like(p)
        p_d, g_d, m_d, v_d = (cp.asarray(a) for a in (p, g, m, v))
        for t in (1, 2):
            adamw_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.01, t)
            ck.adamw_update(p_d, g_d, m_d, v_d, 1e-2, 0.9, 0.999, 1e-8, 0.01, t)
        for name, a_d, a in (("p", p_d, p), ("m", m_d, m), ("v", v_d, v)):
            agree(f"adamw_update {name}", a_d, a, dtype, failures)

        u_d = counter_rng.CounterRNG(cp, 7).random((1000,), dtype)
        same = np.array_equal(cp.asnumpy(u_d), counter_rng.CounterRNG(np, 7).random((1000,), dtype))
        print(f"{'ok' if same else 'FAIL'}: counter_uniform {dtype}: {'bit-identical to' if same else 'differs from'} "
              "the NumPy reference")
        if not same:
            failures.append(f"counter_uniform {dtype}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", action="store_true", help="also run each kernel once on this machine's GPU")
    args = parser.parse_args(argv)
    if not args.launch:
        failures = compile_all()
        return 2 if failures is None else int(failures > 0)
    from nanograd.backend import BackendError, get_backend
    try:
        cp = get_backend("cupy")
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    failures = launch_all(cp)
    print(f"launch: {'PASS' if not failures else 'FAIL: ' + ', '.join(failures)} "
          f"(each kernel once in float and double, {time.perf_counter() - t0:.1f} s with compilation)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
