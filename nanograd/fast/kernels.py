"""The kernel table a fast model walk calls: nanograd.block.PLAIN_KERNELS with faster twins swapped in.

    entry                                on NumPy                        on CuPy
    linear_forward / _backward           cpu_kernels: rows on every core the plain kernel
    relu_forward / _backward             cpu_kernels: rows on every core the plain kernel
    layernorm_forward / _backward        cpu_kernels: rows on every core cuda_kernels: one launch per pass
    attention_forward / _backward        cpu_kernels: batch on every core the plain walk, cuda_kernels' softmax pair
    blocks_forward / _backward           batch_split: a share of the      the plain walk
                                         batch per core
    every other entry                    the plain kernel                the plain kernel

The walk itself (nanograd/block.py, transformer/model.py) is the same for
both tables; only what it calls differs.
"""
import functools
from types import SimpleNamespace

import numpy as np

from ..block import PLAIN_KERNELS


def kernel_table(xp, threads=None):
    """PLAIN_KERNELS with the fast twins for xp (numpy or cupy) in place of the plain entries.
    threads (NumPy): how many threads each kernel may cut its rows over, None for every core;
    with threads given, the walk through the blocks is the plain one (batch_split's shares use this)."""
    table = SimpleNamespace(**vars(PLAIN_KERNELS))
    if xp is np:
        from . import batch_split, cpu_kernels
        for op in ("linear", "relu", "layernorm", "attention"):
            for way in ("forward", "backward"):
                kernel = getattr(cpu_kernels, f"{op}_{way}")
                setattr(table, f"{op}_{way}", kernel if threads is None else functools.partial(kernel, threads=threads))
        if threads is None:
            table.blocks_forward, table.blocks_backward = batch_split.blocks_forward, batch_split.blocks_backward
    else:
        from . import cuda_kernels
        table.layernorm_forward = cuda_kernels.layernorm_forward
        table.layernorm_backward = cuda_kernels.layernorm_backward
        table.attention_forward = cuda_kernels.attention_forward
        table.attention_backward = cuda_kernels.attention_backward
    return table
