"""Freed arrays' memory kept in the process, so each step's arrays land on pages the last step already touched.

A training step makes and frees the same arrays every step: each kernel's
output and cache.  glibc's malloc serves a block above its mmap threshold
(128 KB at first, raised as such blocks are freed) with a fresh mmap, and
gives freed memory at the top of its heap back to the system beyond its trim
threshold.  Either way the next step's arrays land on new pages, which the
system must fault in and zero on first touch.  At nanoGPT's char config that
was ~3,000 page faults and ~9 ms of system time in a 48 ms step (2-core VM,
2026-12-05).

keep_freed_memory serves blocks up to 32 MB (glibc's largest threshold) from
the heap and raises the trim threshold to 1 GB: the pages fault in once, in
the first step.  The cost is that the process keeps the memory of its
largest step until it exits, as PyTorch's CUDA allocator does.  It works
only with glibc (Linux); elsewhere it changes nothing.  The plain path never
calls it.
"""
import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2); it refuses more
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory():
    """From now on in this process, malloc keeps freed memory for the next arrays.  True if glibc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's symbols: its C library's
    except (OSError, AttributeError):
        return False
    # the mmap threshold first: setting either stops glibc moving both, and a trim
    # threshold alone would leave every block over 128 KB to its own mmap
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
