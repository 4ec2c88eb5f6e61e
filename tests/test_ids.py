"""Tests for nanograd/ids.py: ids outside the table are refused alike on NumPy and CuPy."""
import numpy as np
import pytest

from nanograd.cross_entropy import cross_entropy_forward
from nanograd.embedding import embedding_forward
from nanograd.ids import check_ids


@pytest.mark.parametrize("ids", [[0, 3], [3, 3, 0], []])
def test_ids_inside_pass(xp, ids):
    check_ids(xp.asarray(ids, dtype=xp.int64), 4, "token ids")


@pytest.mark.parametrize("ids, got", [([0, 4], "0..4"), ([-1, 2], "-1..2"), ([[5], [-3]], "-3..5")])
def test_ids_outside_raise_naming_the_range(xp, ids, got):
    with pytest.raises(IndexError, match=rf"^token ids must lie in 0\.\.3, got {got}$"):
        check_ids(xp.asarray(ids), 4, "token ids")


@pytest.mark.parametrize("bad", [-1, 4])
def test_embedding_refuses_ids_outside_the_table(xp, bad):
    """NumPy used to read row V-1 for id -1 (and CuPy wraps every id): refused instead."""
    W = xp.asarray(np.arange(12.0).reshape(4, 3))  # (V, C)
    with pytest.raises(IndexError, match=r"token ids must lie in 0\.\.3"):
        embedding_forward(xp.asarray([[0, bad]]), W)


@pytest.mark.parametrize("bad", [-1, 5])
def test_cross_entropy_refuses_targets_outside_the_vocabulary(xp, bad):
    """NumPy used to take logit V-1 for target -1 (CuPy wraps, its CUDA kernel gave NaN): refused instead."""
    with pytest.raises(IndexError, match=r"target ids must lie in 0\.\.4"):
        cross_entropy_forward(xp.zeros((2, 5)), xp.asarray([1, bad]))


def test_model_refuses_an_id_past_its_vocabulary(xp):
    from transformer import Model
    model = Model(dict(d_model=8, num_blocks=1, num_heads=2, context_length=4, max_token_value=11),
                  backend="numpy" if xp is np else "cupy")
    with pytest.raises(IndexError, match=r"token ids must lie in 0\.\.10, got 0\.\.11"):
        model(np.array([[0, 11]]), np.array([[1, 2]]))
    with pytest.raises(IndexError, match=r"target ids must lie in 0\.\.10, got 1\.\.11"):
        model(np.array([[0, 1]]), np.array([[1, 11]]))
