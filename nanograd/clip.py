"""Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_."""
import math

from .backend import get_array_module


def grad_norm(grads):
    """sqrt(sum of every gradient element squared), as a Python float."""
    total = 0.0  # a device scalar on CuPy: one transfer at the end, not one per parameter
    for g in grads.values():
        flat = g.reshape(-1)
        total = total + get_array_module(g).dot(flat, flat)
    return math.sqrt(float(total))


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
