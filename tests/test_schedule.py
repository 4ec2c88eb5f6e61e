"""Tests for transformer/schedule.py: the learning rate of every step against torch's schedulers."""
import math

import pytest
import torch

from transformer.schedule import learning_rate

# torch computes the rates recursively (each step's factor times the last rate), we in closed
# form: the two agree to a few ulps per step, so over <= 100 steps rtol 1e-12 holds; atol 1e-15
# only for a rate that decays to min_lr = 0 exactly at the last step.
RTOL, ATOL = 1e-12, 1e-15


def torch_rates(steps, make_scheduler, base_lr):
    """The rate torch's optimizer uses at each of `steps` optimizer steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


def assert_rates(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= ATOL + RTOL * abs(b), f"step {step}: ours {a!r}, torch {b!r}"


@pytest.mark.parametrize("base_lr, warmup, max_iters, min_lr",
                         [(1e-3, 10, 100, 1e-5), (3e-3, 1, 40, 0.0), (1e-2, 25, 30, 1e-4)])
def test_cosine_with_warmup_matches_torch_sequential_lr(base_lr, warmup, max_iters, min_lr):
    def make(opt):
        return torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_iters - warmup, eta_min=min_lr),
        ], milestones=[warmup])

    ours = [learning_rate(s, base_lr, "cosine", warmup, max_iters, min_lr) for s in range(max_iters)]
    assert_rates(ours, torch_rates(max_iters, make, base_lr))
    assert ours[0] == pytest.approx(base_lr / warmup, rel=1e-12)
    assert ours[warmup] == pytest.approx(base_lr, rel=1e-12)
    # one past the end the cosine has reached min_lr
    assert learning_rate(max_iters, base_lr, "cosine", warmup, max_iters, min_lr) == pytest.approx(
        min_lr, abs=1e-15)


def test_cosine_without_warmup_matches_torch():
    base_lr, max_iters, min_lr = 2e-3, 50, 1e-4
    ours = [learning_rate(s, base_lr, "cosine", 0, max_iters, min_lr) for s in range(max_iters)]
    theirs = torch_rates(max_iters, lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max_iters, eta_min=min_lr), base_lr)
    assert_rates(ours, theirs)
    assert ours[0] == base_lr
    assert all(a > b for a, b in zip(ours, ours[1:]))  # decays monotonically


def test_constant_is_the_books_rate():
    assert [learning_rate(s, 1e-3) for s in range(20)] == [1e-3] * 20
    assert [learning_rate(s, 1e-3, "constant", 0, 20) for s in range(20)] == [1e-3] * 20


def test_constant_with_warmup_matches_torch_linear_lr():
    base_lr, warmup, steps = 1e-3, 7, 20
    ours = [learning_rate(s, base_lr, "constant", warmup, steps) for s in range(steps)]
    theirs = torch_rates(steps, lambda opt: torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1 / warmup, total_iters=warmup), base_lr)
    assert_rates(ours, theirs)
    assert ours[warmup:] == [base_lr] * (steps - warmup)
    assert all(a < b for a, b in zip(ours[:warmup], ours[1:warmup + 1]))
    assert not math.isclose(ours[0], base_lr)
