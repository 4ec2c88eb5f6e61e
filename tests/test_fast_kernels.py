"""Tests for nanograd/fast/kernels.py: the table a fast walk calls."""
import numpy as np

from nanograd.block import PLAIN_KERNELS
from nanograd.fast import batch_split, cpu_kernels
from nanograd.fast.kernels import kernel_table


def test_the_table_has_every_plain_entry_and_no_other():
    assert set(vars(kernel_table(np))) == set(vars(PLAIN_KERNELS))


THREADED = {f"{op}_{way}" for op in ("linear", "relu", "layernorm", "attention") for way in ("forward", "backward")}
WALK = {"blocks_forward", "blocks_backward"}


def test_on_numpy_the_blocks_kernels_are_cpu_kernels_the_walk_batch_split_and_the_rest_plain():
    table = kernel_table(np)
    for name, kernel in vars(table).items():
        twin = cpu_kernels if name in THREADED else batch_split if name in WALK else PLAIN_KERNELS
        assert kernel is getattr(twin, name), name


def test_with_threads_given_each_kernel_keeps_to_them_and_the_walk_is_plain():
    table = kernel_table(np, threads=1)
    for name, kernel in vars(table).items():
        if name in THREADED:
            assert kernel.func is getattr(cpu_kernels, name) and kernel.keywords == {"threads": 1}, name
        else:
            assert kernel is getattr(PLAIN_KERNELS, name), name


def test_a_table_is_a_copy_so_changing_it_leaves_the_plain_one_alone():
    table = kernel_table(np)
    table.relu_forward = None
    assert PLAIN_KERNELS.relu_forward is not None
