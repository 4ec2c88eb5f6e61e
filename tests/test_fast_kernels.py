"""Tests for nanograd/fast/kernels.py: the table a fast walk calls."""
import numpy as np

from nanograd import attention, layernorm
from nanograd.block import PLAIN_KERNELS
from nanograd.fast.kernels import kernel_table


def test_the_table_has_every_plain_entry_and_no_other():
    assert set(vars(kernel_table(np))) == set(vars(PLAIN_KERNELS))


def test_on_numpy_the_table_is_the_plain_kernels():
    table = kernel_table(np)
    assert table.layernorm_forward is layernorm.layernorm_forward
    assert table.layernorm_backward is layernorm.layernorm_backward
    assert table.attention_forward is attention.attention_forward
    assert table.attention_backward is attention.attention_backward


def test_a_table_is_a_copy_so_changing_it_leaves_the_plain_one_alone():
    table = kernel_table(np)
    table.relu_forward = None
    assert PLAIN_KERNELS.relu_forward is not None
