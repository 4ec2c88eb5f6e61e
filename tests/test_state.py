"""transformer/state.py: what a checkpoint holds, and refusing checkpoints that cannot serve."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from nanograd import AdamW
from transformer import Model
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.errors import CheckpointError
from transformer.state import MOMENTS, build_model, load_state, restore_optimizer, save_state

ROOT = Path(__file__).resolve().parents[1]
H = dict(d_model=16, num_blocks=1, num_heads=2, context_length=8, dropout=0.0, max_token_value=50)


def trained(tmp_path):
    model = Model(H, dtype="float64", seed=1)
    opt = AdamW(model.params)
    x = np.random.default_rng(0).integers(0, 50, (2, 8))
    model(x, x)
    opt.step(model.backward())
    save_state(tmp_path / "m.ckpt", model, opt, step=1, run={"seed": 1})
    return model, opt


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = trained(tmp_path)
    tensors, meta = load_state(tmp_path / "m.ckpt")
    again = build_model(tensors, meta)
    assert again.dtype == np.float64 and meta["step"] == 1
    for name in model.params:
        assert np.array_equal(again.params[name], model.params[name])
    opt2 = AdamW(again.params)
    restore_optimizer(opt2, tensors, meta, "m.ckpt")
    assert opt2.t == 1
    for name in model.params:
        assert np.array_equal(opt2.m[name], opt.m[name]) and np.array_equal(opt2.v[name], opt.v[name])


@pytest.mark.parametrize("bad", [{"step": "abc"}, {"step": -1}, {"run": [1]}, {"adamw": {"lr": 1}},
                                 {"format": "something-else"}, {"h_params": {"d_model": 16}}])
def test_malformed_meta_is_refused(tmp_path, bad):
    trained(tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "m.ckpt")
    save_checkpoint(tmp_path / "bad.ckpt", tensors, {**meta, **bad})
    with pytest.raises(CheckpointError):
        load_state(tmp_path / "bad.ckpt")


def test_missing_parameter_is_refused(tmp_path):
    trained(tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "m.ckpt")
    del tensors["transformer_blocks.0.ln1.bias"]
    save_checkpoint(tmp_path / "bad.ckpt", tensors, meta)
    with pytest.raises(CheckpointError, match="ln1.bias"):
        load_state(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("bad_run, message", [({"d_model": "x"}, "malformed run.d_model"),
                                              (None, "no optimizer state")])
def test_resume_refuses_unusable_checkpoints_in_one_line(tmp_path, bad_run, message):
    model, opt = trained(tmp_path)
    if bad_run is None:
        save_state(tmp_path / "bad.ckpt", model)  # weights only, as the converter writes
    else:
        save_state(tmp_path / "bad.ckpt", model, opt, step=1, run=bad_run)
    before = (tmp_path / "bad.ckpt").read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(tmp_path / "bad.ckpt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "bad.ckpt").read_bytes() == before


def test_the_file_is_the_books_state_dict_plus_adamw(tmp_path):
    """Any safetensors reader sees the book's state_dict() keys (masks included) and the moments
    under adamw.exp_avg. and adamw.exp_avg_sq.; load_state drops the masks, keeps the rest."""
    model, opt = trained(tmp_path)
    stored = load_file(tmp_path / "m.ckpt")
    masks = {f"transformer_blocks.0.mha.heads.{h}.mask" for h in range(2)}
    assert set(stored) == set(model.params) | masks | {m + n for m in MOMENTS for n in model.params}
    for name in masks:
        np.testing.assert_array_equal(stored[name], np.tril(np.ones((8, 8))))
    for name in model.params:
        np.testing.assert_array_equal(stored[name], model.params[name])
        np.testing.assert_array_equal(stored["adamw.exp_avg_sq." + name], opt.v[name])
    assert set(load_state(tmp_path / "m.ckpt")[0]) == set(stored) - masks


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer_blocks.0.mha.heads.1.mask"), "lacks the causal mask .*heads.1.mask but holds others"),
    (lambda t: t.update({"transformer_blocks.0.mha.heads.0.mask": np.ones((8, 8))}), "is not the causal mask"),
    (lambda t: t.update({"transformer_blocks.0.mha.heads.0.mask": np.ones((9, 9))}), r"has shape \(9, 9\)"),
])
def test_bad_masks_are_refused(tmp_path, edit, message):
    trained(tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "m.ckpt")
    edit(tensors)
    save_checkpoint(tmp_path / "bad.ckpt", tensors, meta)
    with pytest.raises(CheckpointError, match=message):
        load_state(tmp_path / "bad.ckpt")


def test_a_file_without_masks_loads(tmp_path):
    """Files of the first format hold none: all or none of them, then."""
    model, _ = trained(tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "m.ckpt")
    save_checkpoint(tmp_path / "bare.ckpt", {k: v for k, v in tensors.items() if not k.endswith(".mask")}, meta)
    again = build_model(*load_state(tmp_path / "bare.ckpt"))
    for name in model.params:
        assert np.array_equal(again.params[name], model.params[name])
