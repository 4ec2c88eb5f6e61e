"""The kernel table a fast model walk calls: nanograd.block.PLAIN_KERNELS with faster twins swapped in.

    entry                                on NumPy            on CuPy
    layernorm_forward / _backward        the plain kernel    cuda_kernels: one launch per pass
    attention_forward / _backward        the plain kernel    the plain walk, cuda_kernels' softmax pair
    every other entry                    the plain kernel    the plain kernel

The walk itself (nanograd/block.py, transformer/model.py) is the same for
both tables; only what it calls differs.
"""
from types import SimpleNamespace

import numpy as np

from ..block import PLAIN_KERNELS


def kernel_table(xp):
    """PLAIN_KERNELS with the fast twins for xp (numpy or cupy) in place of the plain entries."""
    table = SimpleNamespace(**vars(PLAIN_KERNELS))
    if xp is not np:
        from . import cuda_kernels
        table.layernorm_forward = cuda_kernels.layernorm_forward
        table.layernorm_backward = cuda_kernels.layernorm_backward
        table.attention_forward = cuda_kernels.attention_forward
        table.attention_backward = cuda_kernels.attention_backward
    return table
