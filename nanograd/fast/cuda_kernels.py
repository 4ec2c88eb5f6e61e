"""Fused CUDA kernels for CuPy arrays: optional extras beside the plain xp kernels.

Each function computes what its plain twin computes, with the same inputs,
outputs and cache, in one or two kernel launches instead of a dozen passes
over memory; tests/test_cuda_kernels.py proves every pair agrees.  The plain
kernels never call these: FastModel (transformer/fast_model.py, through nanograd/fast/kernels.py) and FastAdamW
(nanograd/fast/adamw.py) do, on CuPy arrays, in place of

    nanograd.layernorm_forward / _backward       one block per row (+ column sums for dw, db)
    nanograd.attention.causal_softmax_forward / _backward   one warp per row of attention scores
    nanograd.attention_forward / _backward       the plain attention with the softmax above
    nanograd.cross_entropy_forward / _backward   one block per row of V logits
    nanograd.adamw.adamw_update                  adamw_update (one parameter) and AdamWTables
                                                 (every parameter in one launch, for FastAdamW)

The CUDA source is written once for a type ``real`` and compiled, on first
use, for float or double (CuPy also keeps the binaries in its disk cache).
Sums are taken per thread, then across a warp by shuffles, then across the
block through shared memory: the same sums as the plain kernels' in another
order, so results agree to rounding, not bit for bit.  AdamW and the
cross-entropy backwards have no sums: each of their operations is rounded on
its own, as in the plain kernels, so they agree bit for bit.
"""
import functools
import re

import numpy as np

from .. import attention
from ..backend import cupy
from ..cross_entropy import CrossEntropyCache
from ..ids import check_ids
from ..layernorm import EPS, LayerNormCache

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_ROWS_PER_WARP_BLOCK = 4  # causal softmax: warps (rows) per block of 128 threads

_SOURCE = r"""
// `real` is float or double: the Python side prepends its typedef.
__device__ __forceinline__ float  exp_(float x)   { return expf(x); }
__device__ __forceinline__ double exp_(double x)  { return exp(x); }
__device__ __forceinline__ float  log_(float x)   { return logf(x); }
__device__ __forceinline__ double log_(double x)  { return log(x); }
__device__ __forceinline__ float  sqrt_(float x)  { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ real neg_inf() { return -(real)__int_as_float(0x7f800000); }
__device__ __forceinline__ real nan_()    { return (real)__int_as_float(0x7fffffff); }
// a product rounded on its own, never fused with a following add into one fma
__device__ __forceinline__ float  mul_rn(float a, float b)   { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
// max that keeps a NaN from either side, like numpy's max
__device__ __forceinline__ real max2(real a, real b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ real warp_sum(real v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ real warp_max(real v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = max2(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
// Sum (max) of v over the block, returned to every thread.  blockDim.x is a
// multiple of 32; shared holds 32 reals.  The first barrier lets a previous
// call finish reading shared[0] before it is overwritten.
__device__ real block_sum(real v, real* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_sum(lane < warps ? shared[lane] : (real)0);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}
__device__ real block_max(real v, real* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_max(lane < warps ? shared[lane] : neg_inf());
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

// ---- LayerNorm over rows of C: one block per row ---------------------------------
extern "C" __global__ void layernorm_forward(
        const real* x, const real* w, const real* b, real* out, real* mean, real* rstd,
        long long N, int C, real eps) {
    __shared__ real shared[32];
    long long n = blockIdx.x;
    if (n >= N) return;
    const real* xn = x + n * C;
    real s = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xn[c];
    real m = block_sum(s, shared) / C;
    real ss = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { real d = xn[c] - m; ss += d * d; }
    real var = block_sum(ss, shared) / C;  // biased, like torch
    real r = 1 / sqrt_(var + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[n * C + c] = (xn[c] - m) * r * w[c] + b[c];
    if (threadIdx.x == 0) { mean[n] = m; rstd[n] = r; }
}

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w
extern "C" __global__ void layernorm_backward_dx(
        const real* dout, const real* x, const real* w, const real* mean, const real* rstd,
        real* dx, long long N, int C) {
    __shared__ real shared[32];
    long long n = blockIdx.x;
    if (n >= N) return;
    const real* dn = dout + n * C;
    const real* xn = x + n * C;
    real m = mean[n], r = rstd[n];
    real s1 = 0, s2 = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        real xhat = (xn[c] - m) * r, dxhat = dn[c] * w[c];
        s1 += dxhat;
        s2 += dxhat * xhat;
    }
    real mean_dxhat = block_sum(s1, shared) / C;
    real mean_dxhat_xhat = block_sum(s2, shared) / C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        real xhat = (xn[c] - m) * r, dxhat = dn[c] * w[c];
        dx[n * C + c] = r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
    }
}

// dw, db: thread c sums column c over one chunk of rows; the chunks' partial
// sums (blockIdx.y) are added afterwards, so no atomics and a fixed order.
extern "C" __global__ void layernorm_backward_params(
        const real* dout, const real* x, const real* mean, const real* rstd,
        real* dw_part, real* db_part, long long N, int C, long long rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    long long chunk = blockIdx.y;
    if (c >= C) return;
    long long first = chunk * rows_per_chunk;
    long long last = first + rows_per_chunk < N ? first + rows_per_chunk : N;
    real sw = 0, sb = 0;
    for (long long n = first; n < last; n++) {
        real d = dout[n * C + c];
        sw += d * ((x[n * C + c] - mean[n]) * rstd[n]);
        sb += d;
    }
    dw_part[chunk * C + c] = sw;
    db_part[chunk * C + c] = sb;
}

// ---- causal softmax over rows of T scores: one warp per row ----------------------
// Row r is query position t = r % T of its (b, h); it sees keys 0..t, the rest get 0.
extern "C" __global__ void causal_softmax_forward(
        const real* preatt, real* att, long long rows, int T) {
    long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;  // the whole warp leaves together
    int t = (int)(r % T);
    const real* x = preatt + r * T;
    real m = neg_inf();
    for (int j = lane; j <= t; j += 32) m = max2(m, x[j]);
    m = warp_max(m);
    real s = 0;
    for (int j = lane; j <= t; j += 32) s += exp_(x[j] - m);
    s = warp_sum(s);
    for (int j = lane; j < T; j += 32) att[r * T + j] = j <= t ? exp_(x[j] - m) / s : (real)0;
}

// dpreatt = att * (datt - sum_j(datt * att)); masked entries have att = 0
extern "C" __global__ void causal_softmax_backward(
        const real* datt, const real* att, real* dpreatt, long long rows, int T) {
    long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const real* d = datt + r * T;
    const real* a = att + r * T;
    real s = 0;
    for (int j = lane; j < T; j += 32) s += d[j] * a[j];
    s = warp_sum(s);
    for (int j = lane; j < T; j += 32) dpreatt[r * T + j] = a[j] * (d[j] - s);
}

// ---- softmax cross-entropy over rows of V logits: one block per row ---------------
// One read for the row max and sum(exp(x - max)) together (each thread rescales
// its running sum when its max grows), one more to write exp(x - max), divided
// by the sum when normalize (the probabilities) or not.
extern "C" __global__ void cross_entropy_forward(
        const real* logits, const long long* targets, real* out, real* sumexps, real* losses,
        long long N, long long V, int normalize) {
    __shared__ real shared[32];
    long long n = blockIdx.x;
    if (n >= N) return;
    const real* x = logits + n * V;
    real m = neg_inf(), s = 0;
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        real xj = x[j];
        if (xj > m) { s = s * exp_(m - xj) + 1; m = xj; }
        else if (xj != neg_inf()) s += exp_(xj - m);  // (a -inf logit adds exp(-inf) = 0; a NaN poisons s)
    }
    real row_max = block_max(m, shared);
    real sumexp = block_sum(m == row_max ? s : s * exp_(m - row_max), shared);
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        real e = exp_(x[j] - row_max);
        out[n * V + j] = normalize ? e / sumexp : e;
    }
    if (threadIdx.x == 0) {
        long long target = targets[n];
        sumexps[n] = sumexp;
        losses[n] = (target < 0 || target >= V) ? nan_() : log_(sumexp) - (x[target] - row_max);
    }
}

// dlogits = (probs - onehot(target)) * scale, scale = dloss / N; the one-hot never built
extern "C" __global__ void cross_entropy_backward(
        const real* probs, const long long* targets, real* dlogits, long long N, long long V, real scale) {
    long long n = blockIdx.x;
    if (n >= N) return;
    long long target = targets[n];
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        real p = probs[n * V + j];
        if (j == target) p -= 1;
        dlogits[n * V + j] = p * scale;
    }
}
"""

# ---- AdamW over every parameter in one launch ------------------------------------------
# nanograd.adamw.adamw_update line for line, in the same order, each operation
# rounded to `real` on its own as CuPy's one-operation kernels round it: this
# module is compiled with --fmad=false, so no multiply and add fuse into one
# rounding.  Block b updates elements first[b] .. first[b] + chunk - 1 of tensor
# tensor[b]; ptrs holds 4 rows of `tensors` addresses: p, g, m, v.  Each block
# also writes the sum of its gradient elements' squares (for the global norm),
# so the norm is one sum over blocks in a fixed order: no atomics.
_ADAMW_SOURCE = r"""
extern "C" __global__ void adamw_multi(
        const long long* ptrs, int tensors, const long long* sizes, const int* block_tensor,
        const long long* block_first, int chunk, real* squares,
        real decay, real one_minus_beta1, real beta2, real one_minus_beta2,
        real bias_correction2_sqrt, real eps, real step_size) {
    __shared__ real shared[32];
    int k = block_tensor[blockIdx.x];
    real* p = (real*)ptrs[k];
    const real* g = (const real*)ptrs[tensors + k];
    real* m = (real*)ptrs[2 * tensors + k];
    real* v = (real*)ptrs[3 * tensors + k];
    long long first = block_first[blockIdx.x];
    long long last = first + chunk < sizes[k] ? first + chunk : sizes[k];
    real sq = 0;
    for (long long i = first + threadIdx.x; i < last; i += blockDim.x) {
        real gi = g[i], pi = p[i], mi = m[i], vi = v[i];
        sq += gi * gi;
        pi = pi * decay;
        mi = mi + one_minus_beta1 * (gi - mi);
        vi = vi * beta2;
        vi = vi + one_minus_beta2 * gi * gi;
        real denom = sqrt_(vi) / bias_correction2_sqrt + eps;
        pi = pi - step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
    sq = block_sum(sq, shared);
    if (threadIdx.x == 0) squares[blockIdx.x] = sq;
}
"""
ADAMW_CHUNK = 1 << 14  # elements per block of adamw_multi: 137 parameters of the book's model -> ~1,100 blocks
ADAMW_THREADS = 256
ADAMW_OPTIONS = ("--fmad=false",)


def compile_units():
    """Every CUDA source this module compiles, as (label, source, NVRTC options, kernel names
    the Python side launches): benchmarks/compile_kernels.py compiles each without a GPU."""
    with open(__file__, encoding="utf-8") as f:  # the names this file's _kernel(...) calls ask for
        rows = tuple(dict.fromkeys(re.findall(r'_kernel\("(\w+)"', f.read())))
    return [unit for ctype in ("float", "double") for unit in (
        (f"cuda_kernels ({ctype})", f"typedef {ctype} real;\n{_SOURCE}", (), rows),
        (f"adamw_multi ({ctype})", f"typedef {ctype} real;\n{_SOURCE}{_ADAMW_SOURCE}", ADAMW_OPTIONS,
         ("adamw_multi",)))]


@functools.lru_cache(maxsize=None)
def _module(ctype):
    """The kernels of _SOURCE compiled for real = ctype ('float' or 'double')."""
    return cupy.RawModule(code=f"typedef {ctype} real;\n{_SOURCE}")


@functools.lru_cache(maxsize=None)
def _kernel(name, dtype):
    return _module(_CTYPES[np.dtype(dtype)]).get_function(name)


@functools.lru_cache(maxsize=None)
def _adamw_kernel(dtype):
    ctype = _CTYPES[np.dtype(dtype)]
    module = cupy.RawModule(code=f"typedef {ctype} real;\n{_SOURCE}{_ADAMW_SOURCE}", options=ADAMW_OPTIONS)
    return module.get_function("adamw_multi")


def _threads(n, most):
    """A block size for rows of n: whole warps, at most `most`, no more than n needs."""
    return int(min(most, max(32, -(-n // 32) * 32)))


def _launch(kernel, blocks, threads, args):
    """kernel<<<blocks, threads>>>(args), skipped when there is nothing to do
    (CuPy would round a grid of 0 blocks up to 1)."""
    if all(b > 0 for b in blocks):
        kernel(tuple(int(b) for b in blocks), (int(threads),), args)


# ---- LayerNorm ------------------------------------------------------------------------

def layernorm_forward(x, w, b, eps=EPS):
    """nanograd.layernorm.layernorm_forward in one kernel: (out, LayerNormCache)."""
    C = x.shape[-1]
    N = x.size // C if C else 0
    real = x.dtype.type
    out = cupy.empty(x.shape, dtype=x.dtype)  # (..., C)
    mean = cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)  # (..., 1)
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)  # (..., 1)
    _launch(_kernel("layernorm_forward", x.dtype), (N,), _threads(C, 256),
            (cupy.ascontiguousarray(x), cupy.ascontiguousarray(w), cupy.ascontiguousarray(b),
             out, mean, rstd, np.int64(N), np.int32(C), real(eps)))
    return out, LayerNormCache(x, w, mean, rstd)


def layernorm_backward(dout, cache):
    """nanograd.layernorm.layernorm_backward in two kernels and two column sums: (dx, dw, db)."""
    x, w, mean, rstd = cache
    C = x.shape[-1]
    N = x.size // C if C else 0
    dout, x = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(x)
    mean, rstd = cupy.ascontiguousarray(mean), cupy.ascontiguousarray(rstd)
    dx = cupy.empty(x.shape, dtype=x.dtype)  # (..., C)
    _launch(_kernel("layernorm_backward_dx", x.dtype), (N,), _threads(C, 256),
            (dout, x, cupy.ascontiguousarray(w), mean, rstd, dx, np.int64(N), np.int32(C)))
    rows_per_chunk = max(32, -(-N // 1024))  # at most 1024 chunks of rows
    chunks = -(-N // rows_per_chunk)
    dw_part = cupy.zeros((chunks, C), dtype=x.dtype)  # (chunks, C)
    db_part = cupy.zeros((chunks, C), dtype=x.dtype)  # (chunks, C)
    threads = _threads(C, 128)
    _launch(_kernel("layernorm_backward_params", x.dtype), (-(-C // threads), chunks), threads,
            (dout, x, mean, rstd, dw_part, db_part, np.int64(N), np.int32(C), np.int64(rows_per_chunk)))
    return dx, dw_part.sum(axis=0), db_part.sum(axis=0)  # (..., C), (C,), (C,)


# ---- causal softmax (attention) -------------------------------------------------------

def causal_softmax_forward(preatt):
    """nanograd.attention.causal_softmax_forward in one kernel: att (..., T, T)."""
    T = preatt.shape[-1]
    rows = preatt.size // T if T else 0
    att = cupy.empty(preatt.shape, dtype=preatt.dtype)  # (..., T, T)
    _launch(_kernel("causal_softmax_forward", preatt.dtype), (-(-rows // _ROWS_PER_WARP_BLOCK),),
            32 * _ROWS_PER_WARP_BLOCK, (cupy.ascontiguousarray(preatt), att, np.int64(rows), np.int32(T)))
    return att


def causal_softmax_backward(datt, att):
    """nanograd.attention.causal_softmax_backward in one kernel: dpreatt (..., T, T)."""
    T = att.shape[-1]
    rows = att.size // T if T else 0
    dpreatt = cupy.empty(att.shape, dtype=att.dtype)  # (..., T, T)
    _launch(_kernel("causal_softmax_backward", att.dtype), (-(-rows // _ROWS_PER_WARP_BLOCK),),
            32 * _ROWS_PER_WARP_BLOCK,
            (cupy.ascontiguousarray(datt), cupy.ascontiguousarray(att), dpreatt, np.int64(rows), np.int32(T)))
    return dpreatt


def attention_forward(x, Wq, Wk, Wv, dropout_p=0.0, rng=None, train=True):
    """nanograd.attention_forward, the plain walk, with causal_softmax_forward above as its softmax."""
    return attention.attention_forward(x, Wq, Wk, Wv, dropout_p, rng, train, softmax=causal_softmax_forward)


def attention_backward(dout, cache):
    """nanograd.attention_backward, the plain walk, with causal_softmax_backward above."""
    return attention.attention_backward(dout, cache, softmax_backward=causal_softmax_backward)


# ---- softmax cross-entropy ------------------------------------------------------------

def _cross_entropy_rows(logits, targets, out, normalize):
    """Run the row kernel: out gets exp(logits - rowmax) (/ sumexp if normalize); (loss, sumexp, targets)."""
    N, V = logits.shape
    targets = cupy.ascontiguousarray(cupy.asarray(targets), dtype=cupy.int64)  # (N,)
    sumexp = cupy.empty((N, 1), dtype=logits.dtype)  # (N, 1)
    losses = cupy.empty((N,), dtype=logits.dtype)  # (N,)
    _launch(_kernel("cross_entropy_forward", logits.dtype), (N,), _threads(V, 1024),
            (cupy.ascontiguousarray(logits), targets, out, sumexp, losses, np.int64(N), np.int64(V),
             np.int32(normalize)))
    return losses.mean(), sumexp, targets  # ()


def _scale(dloss, N, dtype):
    """dloss / N as a scalar of dtype.  dloss is a Python float, or a 0-d array when it
    comes from a chain of kernels (then reading it waits for the GPU)."""
    return dtype.type(float(dloss / N))


def cross_entropy_forward(logits, targets):
    """nanograd.cross_entropy.cross_entropy_forward in one kernel and a mean: (loss, cache).

    A target outside 0..V-1 raises IndexError, as the plain kernel does (the
    CUDA kernel itself would give a NaN loss rather than read outside the row).
    """
    check_ids(targets, logits.shape[-1], "target ids")
    probs = cupy.empty(logits.shape, dtype=logits.dtype)  # (N, V)
    loss, _, targets = _cross_entropy_rows(logits, targets, probs, normalize=True)
    return loss, CrossEntropyCache(probs, targets)


def cross_entropy_backward(dloss, cache):
    """nanograd.cross_entropy.cross_entropy_backward in one kernel: dlogits (N, V)."""
    probs, targets = cache
    N, V = probs.shape
    dlogits = cupy.empty((N, V), dtype=probs.dtype)  # (N, V)
    _launch(_kernel("cross_entropy_backward", probs.dtype), (N,), _threads(V, 1024),
            (cupy.ascontiguousarray(probs), cupy.ascontiguousarray(cupy.asarray(targets), dtype=cupy.int64),
             dlogits, np.int64(N), np.int64(V), _scale(dloss, N, probs.dtype)))
    return dlogits


# ---- AdamW ----------------------------------------------------------------------------

def block_table(sizes, chunk):
    """adamw_multi's blocks for tensors of the given sizes, each cut into pieces of chunk
    elements: (tensor of each block (int32), its first element (int64)).  An empty tensor has none."""
    tensor = np.concatenate([np.full(-(-n // chunk), k, np.int32) for k, n in enumerate(sizes)] +
                            [np.empty(0, np.int32)])  # (blocks,)
    first = np.concatenate([np.arange(0, n, chunk, dtype=np.int64) for n in sizes] +
                           [np.empty(0, np.int64)])  # (blocks,)
    return tensor, first


class AdamWTables:
    """The tables adamw_multi reads for a fixed list of parameters and their moments, made once.

    tables.step(grads, ...) then updates every parameter in one launch.  p, m and
    v must be C-contiguous CuPy arrays of one dtype that outlive the tables (their
    addresses are kept); the gradients' addresses are uploaded at each step.
    """

    def __init__(self, params, ms, vs):
        arrays = [*params, *ms, *vs]
        self.dtype = np.dtype(params[0].dtype) if params else np.dtype(np.float32)
        if any(a.dtype != self.dtype or not a.flags.c_contiguous for a in arrays):
            raise ValueError("AdamWTables needs C-contiguous parameters and moments of one dtype")
        if any(m.shape != p.shape or v.shape != p.shape for p, m, v in zip(params, ms, vs)):
            raise ValueError("each moment must have its parameter's shape")
        self.arrays, self.n = arrays, len(params)
        self.shapes = [p.shape for p in params]
        self.ptrs = np.zeros(4 * self.n, np.int64)  # (4 * tensors,) rows p, g, m, v
        for row, group in ((0, params), (2, ms), (3, vs)):
            self.ptrs[row * self.n:(row + 1) * self.n] = [a.data.ptr for a in group]
        sizes = [p.size for p in params]
        tensor, first = block_table(sizes, ADAMW_CHUNK)
        self.sizes = cupy.asarray(np.array(sizes, np.int64))  # (tensors,)
        self.block_tensor, self.block_first = cupy.asarray(tensor), cupy.asarray(first)  # (blocks,) x 2
        self.squares = cupy.zeros(len(tensor), self.dtype)  # (blocks,)

    def step(self, grads, lr, beta1, beta2, eps, weight_decay, t):
        """adamw_update of every parameter from grads (a list in the parameters' order), in
        one launch.  Returns the per-block sums of the gradients' squares (a device array:
        their sum is the squared global norm)."""
        if len(grads) != self.n or any(g.shape != s for g, s in zip(grads, self.shapes)):
            raise ValueError("one gradient per parameter, with its shape, in the parameters' order")
        grads = [cupy.ascontiguousarray(g, dtype=self.dtype) for g in grads]
        self.ptrs[self.n:2 * self.n] = [g.data.ptr for g in grads]
        ptrs = cupy.asarray(self.ptrs)  # (4 * tensors,) one copy to the device
        real = self.dtype.type
        _launch(_adamw_kernel(self.dtype), (len(self.squares),), ADAMW_THREADS,
                (ptrs, np.int32(self.n), self.sizes, self.block_tensor, self.block_first,
                 np.int32(ADAMW_CHUNK), self.squares, real(1 - lr * weight_decay), real(1 - beta1),
                 real(beta2), real(1 - beta2), real((1 - beta2 ** t) ** 0.5), real(eps),
                 real(lr / (1 - beta1 ** t))))
        self.grads = grads  # kept to the next step: the kernel may still be reading them
        return self.squares


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """nanograd.adamw.adamw_update in one kernel: p, m, v (C-contiguous) updated in place from g.

    The scalars are the plain version's Python floats, each rounded to p's
    dtype as CuPy rounds a Python float that meets an array.  (FastAdamW keeps
    one AdamWTables for all its parameters instead of this one-parameter one.)
    """
    AdamWTables([p], [m], [v]).step([g], lr, beta1, beta2, eps, weight_decay, t)
