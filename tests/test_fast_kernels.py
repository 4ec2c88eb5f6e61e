"""Tests for nanograd/fast/kernels.py: the table a fast walk calls."""
import numpy as np

from nanograd.block import PLAIN_KERNELS
from nanograd.fast import cpu_kernels
from nanograd.fast.kernels import kernel_table


def test_the_table_has_every_plain_entry_and_no_other():
    assert set(vars(kernel_table(np))) == set(vars(PLAIN_KERNELS))


def test_on_numpy_the_blocks_kernels_are_cpu_kernels_and_the_rest_plain():
    table = kernel_table(np)
    threaded = {f"{op}_{way}" for op in ("linear", "relu", "layernorm", "attention") for way in ("forward", "backward")}
    for name, kernel in vars(table).items():
        assert kernel is (getattr(cpu_kernels, name) if name in threaded else getattr(PLAIN_KERNELS, name)), name


def test_a_table_is_a_copy_so_changing_it_leaves_the_plain_one_alone():
    table = kernel_table(np)
    table.relu_forward = None
    assert PLAIN_KERNELS.relu_forward is not None
