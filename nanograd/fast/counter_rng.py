"""A counter-based random generator: uniform numbers that are a hash of (key, draw, element).

backend.make_rng hands one to CuPy code, where a cuRAND generator would
initialise 32,768 states (a kernel launch and ~1 MB written) every time train.py
seeds a micro-step; this one costs nothing to make.  Draw number c of a
generator with key k is SplitMix64 started at s = mix(k ^ mix(c)): element i is

    z = s + (i + 1) * GOLDEN,  then  z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^= z >> 31

(all modulo 2**64), and its top 24 bits (float32) or 53 bits (float64), times
2**-24 or 2**-53, are the uniform number in [0, 1).  The same key gives the same
numbers, so a resumed run, which makes the same keys, draws what an uninterrupted
one draws.  On NumPy the hash is computed with uint64 arrays (the reference);
on CuPy by one CUDA kernel (SOURCE), equal to it bit for bit.
"""
import functools

import numpy as np

MASK = (1 << 64) - 1
GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
THREADS = 256

SOURCE = r"""
__device__ __forceinline__ unsigned long long counter_hash(unsigned long long s, long long i) {
    unsigned long long z = s + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// out[i] = top 24 (53) bits of the hash of element i, times 2^-24 (2^-53): exact, in [0, 1)
extern "C" __global__ void counter_uniform_float(float* out, unsigned long long s, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = (float)(counter_hash(s, i) >> 40) * 5.9604644775390625e-08f;
}
extern "C" __global__ void counter_uniform_double(double* out, unsigned long long s, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = (double)(counter_hash(s, i) >> 11) * 1.1102230246251565e-16;
}
"""
KERNELS = ("counter_uniform_float", "counter_uniform_double")


def mix(z):
    """SplitMix64's step on a Python int: a well-scrambled 64-bit function of z."""
    z = (z + GOLDEN) & MASK
    z = ((z ^ (z >> 30)) * M1) & MASK
    z = ((z ^ (z >> 27)) * M2) & MASK
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=None)
def _kernel(name):
    import cupy
    return cupy.RawModule(code=SOURCE).get_function(name)


class CounterRNG:
    """rng.random(shape, dtype) -> uniform [0, 1) on xp's device; each call is the next draw."""

    def __init__(self, xp, key):
        self.xp, self.key, self.draws = xp, int(key) & MASK, 0

    def random(self, shape, dtype=np.float64):
        """The next draw: an array of `shape` uniform numbers in [0, 1), float32 or float64."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"CounterRNG draws float32 or float64, not {dtype}")
        s = mix(self.key ^ mix(self.draws))
        self.draws += 1
        xp = self.xp
        out = xp.empty(shape, dtype=dtype)  # (...)
        n = out.size
        if xp is np:
            z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(s)  # (n,) wraps mod 2**64
            z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
            z ^= z >> np.uint64(31)
            if dtype == np.float32:
                out.reshape(-1)[:] = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
            else:
                out.reshape(-1)[:] = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        elif n:
            name = "counter_uniform_float" if dtype == np.float32 else "counter_uniform_double"
            blocks = min(-(-n // THREADS), 8192)  # a grid-stride loop covers the rest
            _kernel(name)((blocks,), (THREADS,), (out, np.uint64(s), np.int64(n)))
        return out
