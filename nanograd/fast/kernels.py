"""The kernel table a fast model walk calls: nanograd.block.PLAIN_KERNELS with faster twins swapped in.

    entry                                on NumPy                        on CuPy
    linear_forward / _backward           cpu_kernels: rows on every core the plain kernel
    relu_forward / _backward             cpu_kernels: rows on every core the plain kernel
    layernorm_forward / _backward        cpu_kernels: rows on every core cuda_kernels: one launch per pass
    attention_forward / _backward        cpu_kernels: batch on every core the plain walk, cuda_kernels' softmax pair
    every other entry                    the plain kernel                the plain kernel

The walk itself (nanograd/block.py, transformer/model.py) is the same for
both tables; only what it calls differs.
"""
from types import SimpleNamespace

import numpy as np

from ..block import PLAIN_KERNELS


def kernel_table(xp):
    """PLAIN_KERNELS with the fast twins for xp (numpy or cupy) in place of the plain entries."""
    table = SimpleNamespace(**vars(PLAIN_KERNELS))
    if xp is np:
        from . import cpu_kernels
        for op in ("linear", "relu", "layernorm", "attention"):
            for way in ("forward", "backward"):
                setattr(table, f"{op}_{way}", getattr(cpu_kernels, f"{op}_{way}"))
    else:
        from . import cuda_kernels
        table.layernorm_forward = cuda_kernels.layernorm_forward
        table.layernorm_backward = cuda_kernels.layernorm_backward
        table.attention_forward = cuda_kernels.attention_forward
        table.attention_backward = cuda_kernels.attention_backward
    return table
