"""Learning-rate schedules: the book's constant rate, or linear warm-up then cosine decay."""
import math


def learning_rate(step, base_lr, schedule="constant", warmup_iters=0, max_iters=1, min_lr=0.0):
    """The rate for optimizer step `step` (0-based).

    constant: base_lr at every step, with a linear warm-up if warmup_iters > 0.
    cosine:   linear warm-up over warmup_iters steps from base_lr / warmup_iters
              to base_lr, then cosine decay to min_lr at step max_iters.
    The same numbers as torch's SequentialLR of LinearLR(start_factor=1/warmup_iters,
    total_iters=warmup_iters) and CosineAnnealingLR(T_max=max_iters - warmup_iters,
    eta_min=min_lr) (or ConstantLR-free LinearLR alone for constant).
    """
    if step < warmup_iters:
        start = 1.0 / warmup_iters
        return base_lr * (start + (1.0 - start) * step / warmup_iters)
    if schedule == "constant":
        return base_lr
    decay_steps = max(max_iters - warmup_iters, 1)
    progress = min(step - warmup_iters, decay_steps) / decay_steps
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
