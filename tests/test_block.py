"""Tests for nanograd/block.py: one transformer block's backward, by finite differences and the torch oracle."""
import numpy as np
import pytest

from nanograd.backend import make_rng
from nanograd.block import PLAIN_KERNELS, BlockParams, block_backward, block_forward, blocks_backward, blocks_forward
from nanograd.gradcheck import check_kernel

B, T, C, NH = 2, 4, 8, 2


def block_params(rng):
    hs = C // NH
    shapes = BlockParams(ln1_w=(C,), ln1_b=(C,), Wq=(NH, hs, C), Wk=(NH, hs, C), Wv=(NH, hs, C),
                         proj_W=(C, C), proj_b=(C,), ln2_w=(C,), ln2_b=(C,),
                         fc1_W=(4 * C, C), fc1_b=(4 * C,), fc2_W=(C, 4 * C), fc2_b=(C,))
    return BlockParams(*(rng.standard_normal(shape) * 0.5 + (1.0 if name.endswith("_w") else 0.0)
                         for name, shape in zip(BlockParams._fields, shapes)))


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_every_block_gradient_agrees_with_finite_differences(p):
    """sum(out * G) for a random G: dx and all 13 parameters, the residual fan-outs included."""
    rng = np.random.default_rng(0)

    def forward(x, *params):  # the same dropout masks every call
        return block_forward(x, BlockParams(*params), p, make_rng(np, 7), True)

    def backward(dout, cache):
        dx, grads = block_backward(dout, cache)
        return (dx, *grads)

    inputs = [rng.standard_normal((B, T, C)), *block_params(rng)]
    rows = check_kernel("block", forward, backward, inputs, list(range(len(inputs))),
                        ["x", *BlockParams._fields])
    assert [r.input for r in rows if not r.ok] == []
    assert len(rows) == 14


def test_the_block_calls_only_the_table_it_is_given():
    """The walk is written once: a table of wrapped kernels sees every call, forward and backward."""
    calls = []
    table = type(PLAIN_KERNELS)(**{name: (lambda *a, _f=f, _n=name, **k: calls.append(_n) or _f(*a, **k))
                                   for name, f in vars(PLAIN_KERNELS).items()})
    rng = np.random.default_rng(1)
    out, cache = block_forward(rng.standard_normal((B, T, C)), block_params(rng), kernels=table)
    block_backward(np.ones_like(out), cache)
    assert sorted(set(calls)) == sorted(set(vars(PLAIN_KERNELS)) - {"embedding_forward", "embedding_backward",
                                                                   "blocks_forward", "blocks_backward"})
    assert calls.count("linear_forward") == 3 and calls.count("linear_backward") == 3


def test_blocks_forward_and_backward_are_block_forward_and_backward_in_turn():
    """The walk through a stack: each block's output feeds the next, and the backward runs last to first."""
    rng = np.random.default_rng(2)
    stack = [block_params(rng) for _ in range(3)]
    x, dout = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
    out, caches = blocks_forward(x, stack, 0.2, make_rng(np, 5), True)
    dx, grads = blocks_backward(dout, caches)
    rng_again, y, one_by_one = make_rng(np, 5), x, []
    for blk in stack:
        y, cache = block_forward(y, blk, 0.2, rng_again, True)
        one_by_one.append(cache)
    np.testing.assert_array_equal(out, y)
    dy, expected = dout, [None] * len(stack)
    for i in reversed(range(len(stack))):
        dy, expected[i] = block_backward(dy, one_by_one[i])
    np.testing.assert_array_equal(dx, dy)
    for got, want in zip(grads, expected):
        for name, g, w in zip(BlockParams._fields, got, want):
            np.testing.assert_array_equal(g, w, err_msg=name)
