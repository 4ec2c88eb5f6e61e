"""Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_."""
import math

import numpy as np

from .adamw import PART
from .backend import element_groups, get_array_module, parallel


def grad_norm(grads):
    """sqrt(sum of every gradient element squared), as a Python float.

    On NumPy the CPU threads each sum the squares of a share of the elements.
    """
    flats = [g.reshape(-1) for g in grads.values()]
    if flats and isinstance(flats[0], np.ndarray):
        groups = element_groups([f.size for f in flats], PART)
        sums = np.zeros(len(groups))  # (groups,) one partial sum per thread task
        parallel([(_sum_squares, [flats[i][start:stop] for i, start, stop in group], sums[k:k + 1])
                  for k, group in enumerate(groups)])
        return math.sqrt(float(sums.sum()))
    total = 0.0  # a device scalar on CuPy: one transfer at the end, not one per parameter
    for flat in flats:
        total = total + get_array_module(flat).dot(flat, flat)
    return math.sqrt(float(total))


def _sum_squares(pieces, out):
    """out[0] = sum of the squares of every element of pieces (1-D arrays)."""
    out[0] = sum(float(piece @ piece) for piece in pieces)


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place by min(1, max_norm / (norm + 1e-6)); return the norm before.

    The same rule as torch: the 1e-6 keeps the scale finite for a zero
    gradient, and a norm already under max_norm leaves the gradients as they are.
    """
    norm = grad_norm(grads)
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in grads.values():
            g *= scale
    return norm
