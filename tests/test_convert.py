"""python -m transformer.convert: the book's torch checkpoints to ours and back."""
import os
import pickle

import numpy as np
import pytest
import torch

from transformer import Model, book_torch
from transformer.convert import main
from transformer.state import build_model, load_state, save_state

H = dict(d_model=16, num_blocks=2, num_heads=2, context_length=8, dropout=0.0, max_token_value=40)


def book_checkpoint(path, dtype=torch.float32):
    """A checkpoint as the book's train.py saves it, from a randomly initialised book Model."""
    torch.manual_seed(0)
    model = book_torch.Model({**H, "device": "cpu", "TORCH_SEED": 1337}).to(dtype)
    torch.save({"model_state_dict": model.state_dict(), "h_params": {**H, "device": "cpu"}}, path)
    return model


def test_book_to_ours_gives_the_same_logits(tmp_path):
    model = book_checkpoint(tmp_path / "book.ckpt", torch.float64)
    assert main([str(tmp_path / "book.ckpt"), str(tmp_path / "ours.ckpt")]) == 0
    ours = build_model(*load_state(tmp_path / "ours.ckpt"))
    assert ours.dtype == np.float64
    idx = np.random.default_rng(0).integers(0, 40, (2, 8))
    model.eval()
    ours.eval()
    expected = model(torch.from_numpy(idx))[0].detach().numpy()
    # the book's float32 position table vs ours in float64: 1e-7-level differences in the inputs
    np.testing.assert_allclose(ours(idx)[0], expected, rtol=1e-6, atol=1e-6)


def test_ours_to_book_loads_strictly_into_the_book_model(tmp_path):
    ours = Model(H, seed=3)
    save_state(tmp_path / "ours.ckpt", ours)
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.ckpt")]) == 0
    ckpt = torch.load(tmp_path / "book.ckpt", weights_only=True)
    model = book_torch.Model(ckpt["h_params"])
    model.load_state_dict(ckpt["model_state_dict"], strict=True)  # masks included
    model.eval()
    idx = np.random.default_rng(1).integers(0, 40, (2, 8))
    expected = model(torch.from_numpy(idx))[0].detach().numpy()
    np.testing.assert_allclose(ours.eval()(idx)[0], expected, rtol=1e-4, atol=1e-5)  # float32 both


def test_round_trip_is_exact(tmp_path):
    book_checkpoint(tmp_path / "a.ckpt")
    assert main([str(tmp_path / "a.ckpt"), str(tmp_path / "ours.ckpt")]) == 0
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "b.ckpt")]) == 0
    a = torch.load(tmp_path / "a.ckpt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b.ckpt", weights_only=True)["model_state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("content", ["junk", "pickle", "missing"])
def test_bad_inputs_are_refused_in_one_line(tmp_path, capsys, content, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src.ckpt"
    if content == "junk":
        src.write_bytes(b"not a checkpoint at all")
    elif content == "pickle":
        torch.save({"model_state_dict": Boom(), "h_params": {}}, src, _use_new_zipfile_serialization=True)
    assert main([str(src), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "pwned").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    book_checkpoint(tmp_path / "book.ckpt")
    (tmp_path / "ours.ckpt").write_bytes(b"precious")
    assert main([str(tmp_path / "book.ckpt"), str(tmp_path / "ours.ckpt")]) == 2
    assert (tmp_path / "ours.ckpt").read_bytes() == b"precious"
    assert "--force" in capsys.readouterr().err


def test_compact_vocab_checkpoint_is_refused(tmp_path, capsys):
    save_state(tmp_path / "ours.ckpt", Model(H), vocab=np.arange(40) * 3)
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.ckpt")]) == 2
    assert "compact-vocab" in capsys.readouterr().err
    assert not (tmp_path / "book.ckpt").exists()


def test_pickle_module_is_never_used(tmp_path, monkeypatch):
    """Reading our checkpoint goes through our own parser only."""
    save_state(tmp_path / "ours.ckpt", Model(H))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    tensors, meta = load_state(tmp_path / "ours.ckpt")
    assert meta["h_params"]["d_model"] == 16


def test_without_torch_the_message_gives_the_pinned_install(tmp_path, monkeypatch, capsys):
    """Issue 13.8: the README pins torch; installing torch unpinned fetches whatever is newest."""
    save_state(tmp_path / "ours.ckpt", Model(H))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.ckpt")]) == 2
    assert capsys.readouterr().err == "error: converting needs PyTorch: pip install torch==2.13.0\n"
    assert not (tmp_path / "book.ckpt").exists()
