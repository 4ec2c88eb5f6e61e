"""Tests for nanograd/clip.py: global-norm clipping equal to torch.nn.utils.clip_grad_norm_."""
import math

import numpy as np
import pytest
import torch

from nanograd.backend import to_host
from nanograd.clip import clip_grad_norm, grad_norm

# float64, the same formula (one global 2-norm, scale min(1, max_norm / (norm + 1e-6))):
# only the summation order differs, a few ulps.
RTOL = 1e-12
SHAPES = {"wte": (7, 3), "ln.bias": (3,), "head": (2, 3, 4), "zero": (2, 2)}


def gradients(xp, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    g = {name: scale * rng.standard_normal(shape) for name, shape in SHAPES.items()}
    g["zero"][...] = 0.0
    return {name: xp.asarray(a) for name, a in g.items()}


def torch_clip(grads, max_norm):
    params = []
    for g in grads.values():
        p = torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
        p.grad = torch.tensor(to_host(g))
        params.append(p)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm), [p.grad.numpy() for p in params]


@pytest.mark.parametrize("max_norm, seed", [(0.5, 0), (1.0, 1), (1e3, 2), (2.0, 3)])
def test_matches_torch_clip_grad_norm(xp, max_norm, seed):
    grads = gradients(xp, seed)
    before = {name: to_host(g).copy() for name, g in grads.items()}
    expected_norm, expected = torch_clip(grads, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected_norm, rel=RTOL, abs=0)
    assert norm == pytest.approx(math.sqrt(sum((b ** 2).sum() for b in before.values())), rel=RTOL)
    for g, e in zip(grads.values(), expected):
        np.testing.assert_allclose(to_host(g), e, rtol=RTOL, atol=0)
    clipped = norm > max_norm
    assert clipped == (max_norm < 4.0)  # the chosen cases: three clip, one does not
    for name, g in grads.items():
        if clipped:
            np.testing.assert_allclose(to_host(g), before[name] * max_norm / (norm + 1e-6), rtol=RTOL)
        else:  # untouched, bit for bit
            np.testing.assert_array_equal(to_host(g), before[name])
    if clipped:
        assert grad_norm(grads) == pytest.approx(max_norm, rel=1e-6)


def test_zero_gradient_stays_zero(xp):
    grads = {name: xp.zeros(shape) for name, shape in SHAPES.items()}
    assert clip_grad_norm(grads, 1.0) == 0.0
    assert all(not to_host(g).any() for g in grads.values())


def test_float32_grads_stay_float32(xp):
    grads = {name: g.astype(np.float32) for name, g in gradients(xp, 4, scale=10.0).items()}
    clip_grad_norm(grads, 1.0)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
