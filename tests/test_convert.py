"""python -m transformer.convert: the book's torch checkpoints to ours and back, ours to ours
(weights only, or from the first format)."""
import json
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from nanograd import AdamW

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
    model = book_checkpoint(tmp_path / "book.pt", torch.float64)
    assert main([str(tmp_path / "book.pt"), str(tmp_path / "ours.ckpt")]) == 0
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
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.pt")]) == 0
    ckpt = torch.load(tmp_path / "book.pt", weights_only=True)
    model = book_torch.Model(ckpt["h_params"])
    model.load_state_dict(ckpt["model_state_dict"], strict=True)  # masks included
    model.eval()
    idx = np.random.default_rng(1).integers(0, 40, (2, 8))
    expected = model(torch.from_numpy(idx))[0].detach().numpy()
    np.testing.assert_allclose(ours.eval()(idx)[0], expected, rtol=1e-4, atol=1e-5)  # float32 both


def test_round_trip_is_exact(tmp_path):
    book_checkpoint(tmp_path / "a.pt")
    assert main([str(tmp_path / "a.pt"), str(tmp_path / "ours.ckpt")]) == 0
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "b.pth")]) == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b.pth", weights_only=True)["model_state_dict"]
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
    book_checkpoint(tmp_path / "book.pt")
    (tmp_path / "ours.ckpt").write_bytes(b"precious")
    assert main([str(tmp_path / "book.pt"), str(tmp_path / "ours.ckpt")]) == 2
    assert (tmp_path / "ours.ckpt").read_bytes() == b"precious"
    assert "--force" in capsys.readouterr().err


def test_compact_vocab_checkpoint_is_refused(tmp_path, capsys):
    save_state(tmp_path / "ours.ckpt", Model(H), vocab=np.arange(40) * 3)
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.pt")]) == 2
    assert "compact-vocab" in capsys.readouterr().err
    assert not (tmp_path / "book.pt").exists()


def test_pickle_module_is_never_used(tmp_path, monkeypatch):
    """Reading our checkpoint goes through our own parser only."""
    save_state(tmp_path / "ours.ckpt", Model(H))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    tensors, meta = load_state(tmp_path / "ours.ckpt")
    assert meta["h_params"]["d_model"] == 16


# ---- crafted torch files: every field is checked before anything is built --------------

def crafted_book(path, edit):
    """A book checkpoint at path after edit(state_dict, h_params) -> (state_dict, h_params)."""
    model = book_checkpoint(path)
    state, h_params = edit(dict(model.state_dict()), {**H, "device": "cpu"})
    torch.save({"model_state_dict": state, "h_params": h_params}, path)


EMB = "token_embedding_lookup_table.weight"
CRAFTED_BOOK = [
    ("h-params-list", lambda s, h: (s, list(h.items())), r"not the book's .* checkpoint \(two dicts\)"),
    ("state-dict-list", lambda s, h: (list(s.values()), h), r"not the book's .* checkpoint \(two dicts\)"),
    ("dropout-string", lambda s, h: (s, {**h, "dropout": "0.1"}), r"unusable h_params: dropout must be a number"),
    ("num-blocks-10**7", lambda s, h: (s, {**h, "num_blocks": 10**7}),
     r"holds 37 weight tensors but the book's model for its h_params has 160000005"),
    ("context-length-10**8", lambda s, h: (s, {**h, "context_length": 10**8}),
     r"converting .* context_length 100000000\) needs about [\d.]+ GB of memory"),
    ("sparse", lambda s, h: ({**s, EMB: s[EMB].to_sparse()}, h), rf"{EMB} is a torch.sparse_coo tensor"),
    ("bfloat16", lambda s, h: ({**s, EMB: s[EMB].bfloat16()}, h), rf"{EMB} is torch.bfloat16; only float32"),
    ("complex", lambda s, h: ({**s, EMB: s[EMB].to(torch.complex64)}, h), r"is torch.complex64"),
    ("not-a-tensor", lambda s, h: ({**s, EMB: [1.0, 2.0]}, h), rf"{EMB} is list, not a dense tensor"),
    ("wrong-shape", lambda s, h: ({**s, EMB: s[EMB].T.contiguous()}, h), r"has shape \(16, 40\)"),
    ("nan", lambda s, h: ({**s, EMB: s[EMB] * float("nan")}, h), r"holds NaN or infinite values"),
]


@pytest.mark.parametrize("name, edit, message", CRAFTED_BOOK, ids=[c[0] for c in CRAFTED_BOOK])
def test_crafted_book_checkpoints_are_refused(tmp_path, capsys, monkeypatch, name, edit, message):
    monkeypatch.setenv("NANOGRAD_MEMORY_LIMIT", str(2 * 10**9))
    crafted_book(tmp_path / "book.pt", edit)
    assert main([str(tmp_path / "book.pt"), str(tmp_path / "ours.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.pt"]


def test_a_zip_that_unpacks_past_the_budget_is_refused_before_torch_reads_it(tmp_path, capsys, monkeypatch):
    """torch's zip entries may be deflated: a small file could unpack to gigabytes."""
    import zipfile
    monkeypatch.setenv("NANOGRAD_MEMORY_LIMIT", str(2 * 10**8))
    with zipfile.ZipFile(tmp_path / "bomb.ckpt", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(2 * 10**8))  # 200 MB of zeros, about 200 kB deflated
    assert (tmp_path / "bomb.ckpt").stat().st_size < 10**6
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    assert main([str(tmp_path / "bomb.ckpt"), str(tmp_path / "ours.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"unpack to 200\.0 MB\) needs about 400\.0 MB of memory", err), err


def test_a_fifo_source_is_refused_without_waiting(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    assert main([str(tmp_path / "pipe"), str(tmp_path / "ours.ckpt")]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("direction", ["to-ours", "to-book"])
def test_output_that_is_a_directory_is_refused(tmp_path, capsys, direction):
    src = tmp_path / "src.ckpt"
    book_checkpoint(src) if direction == "to-ours" else save_state(src, Model(H))
    (tmp_path / "out").mkdir()
    assert main([str(src), str(tmp_path / "out"), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out is a directory; give a file path such as" in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("direction", ["to-ours", "to-book"])
def test_output_in_a_missing_folder_is_created(tmp_path, direction):
    src = tmp_path / "src.ckpt"
    book_checkpoint(src) if direction == "to-ours" else save_state(src, Model(H))
    dst = tmp_path / "new" / "deeper" / ("out.ckpt" if direction == "to-ours" else "out.pt")
    assert main([str(src), str(dst)]) == 0
    assert os.listdir(dst.parent) == [dst.name]  # no temp file left


@pytest.mark.parametrize("direction", ["to-ours", "to-book"])
def test_a_failed_write_is_one_line_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch, direction):
    """A read-only folder, a full disk: chmod does not stop root, so the write itself fails here."""
    src = tmp_path / "src.ckpt"
    book_checkpoint(src) if direction == "to-ours" else save_state(src, Model(H))
    (tmp_path / "out").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    def half_written(obj, f, *args, **kwargs):  # torch.save reports a failed write as a RuntimeError
        with open(f, "wb") as partial:
            partial.write(b"PK\x03\x04 half a zip")
        raise RuntimeError(f"File {f} cannot be opened.")
    if direction == "to-book":
        monkeypatch.setattr(torch, "save", half_written)
    else:
        monkeypatch.setattr(os, "replace", refuse)
    dst = tmp_path / "out" / ("m.ckpt" if direction == "to-ours" else "m.pt")
    assert main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"cannot write .*m\.(ckpt|pt) \(.*\); nothing was written there", err), err
    assert list((tmp_path / "out").iterdir()) == []


def test_without_torch_the_message_gives_the_pinned_install(tmp_path, monkeypatch, capsys):
    """Issue 13.8: the README pins torch; installing torch unpinned fetches whatever is newest."""
    save_state(tmp_path / "ours.ckpt", Model(H))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.pt")]) == 2
    assert capsys.readouterr().err == "error: converting needs PyTorch: pip install torch==2.13.0\n"
    assert not (tmp_path / "book.pt").exists()
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "w.safetensors"), "--weights-only"]) == 0  # no torch needed


# ---- ours -> ours: the weights-only export, and the output's name choosing its format -------

BOOK_SHAPE = dict(d_model=80, num_blocks=6, num_heads=4, context_length=128, dropout=0.1, max_token_value=1000)


def trained_checkpoint(path, dtype="float32", h=H):
    """A checkpoint with AdamW's state after one step, as train.py writes it; returns the model."""
    model = Model(h, dtype=dtype, seed=5)
    opt = AdamW(model.params)
    x = np.random.default_rng(2).integers(0, 40, (2, 8))  # (B, T)
    model(x, x)
    opt.step(model.backward())
    save_state(path, model, opt, step=1, run={"seed": 5})
    return model


# the book's float32 position table vs ours (built in float64, then rounded), and float32 sums in
# another order: the logits agree to float32 rounding, not bit for bit.  Measured: 8 ulp of the
# largest logit at the book's d_model 80, 6 blocks (1.8e-6 of 2.6); allowed: 32 ulp of it.
LOGITS_ULPS = 32


@pytest.mark.parametrize("h", [H, BOOK_SHAPE], ids=["tiny", "book-shape"])
def test_weights_only_export_loads_strictly_into_the_books_model(tmp_path, h):
    """safetensors.torch.load_file + load_state_dict(strict=True) on the book's exact Model: the
    masks are in the file, the optimizer state is not; the logits are ours."""
    ours = trained_checkpoint(tmp_path / "run.ckpt", h=h)
    assert main([str(tmp_path / "run.ckpt"), str(tmp_path / "w.safetensors"), "--weights-only"]) == 0
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        h_params = json.loads(f.metadata()["h_params"])
    model = book_torch.Model(h_params)
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "w.safetensors"), strict=True)
    idx = np.random.default_rng(1).integers(0, 40, (2, h["context_length"]))  # (B, T)
    expected = model.eval()(torch.from_numpy(idx))[0].detach().numpy()
    got = ours.eval()(idx)[0]
    assert got.dtype == expected.dtype == np.float32
    assert np.abs(got - expected).max() <= LOGITS_ULPS * np.finfo(np.float32).eps * np.abs(expected).max()
    tensors, meta = load_state(tmp_path / "w.safetensors")  # and it is still a checkpoint of ours
    assert meta["adamw"] is None and not any(name.startswith("adamw.") for name in tensors)
    moments = 2 * sum(p.nbytes for p in ours.params.values())  # what the export leaves out, with their
    saved = (tmp_path / "run.ckpt").stat().st_size - (tmp_path / "w.safetensors").stat().st_size
    assert moments <= saved < moments + 2 * len(ours.params) * 256  # header entries (names, offsets)


def test_a_full_checkpoint_loads_strictly_without_its_adamw_tensors(tmp_path):
    """The training checkpoint itself: the book's state_dict() plus adamw.*, nothing else."""
    trained_checkpoint(tmp_path / "run.ckpt", dtype="float64")
    stored = safetensors.torch.load_file(tmp_path / "run.ckpt")
    weights = {k: v for k, v in stored.items() if not k.startswith("adamw.")}
    book_torch.Model(H).double().load_state_dict(weights, strict=True)


@pytest.mark.parametrize("dst", ["copy.ckpt", "copy.safetensors", "copy"])
def test_ours_to_ours_keeps_everything_and_never_writes_pytorch(tmp_path, dst):
    """`convert model.ckpt x.ckpt` used to write a PyTorch file under our extension."""
    trained_checkpoint(tmp_path / "run.ckpt")
    assert main([str(tmp_path / "run.ckpt"), str(tmp_path / dst)]) == 0
    assert not zipfile.is_zipfile(tmp_path / dst)
    (a, a_meta), (b, b_meta) = load_state(tmp_path / "run.ckpt"), load_state(tmp_path / dst)
    assert a_meta == b_meta and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_help_says_which_way_it_converts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "a .pt or .pth\nfile gets the book's torch.save" in text and "--weights-only" in text


def test_pytorch_to_pytorch_is_refused(tmp_path, capsys):
    book_checkpoint(tmp_path / "book.pt")
    assert main([str(tmp_path / "book.pt"), str(tmp_path / "again.pt")]) == 2
    assert "would be a PyTorch file too" in capsys.readouterr().err
    assert not (tmp_path / "again.pt").exists()


def test_the_examples_of_docs_checkpoint_md_run(tmp_path, monkeypatch):
    """The page's ```py examples (loading from NumPy, into the book's PyTorch Model, the checksum by
    hand), run as written on a training checkpoint at model/model.ckpt and its weights-only export."""
    monkeypatch.chdir(tmp_path)
    trained_checkpoint(tmp_path / "model" / "model.ckpt")
    assert main(["model/model.ckpt", "model.safetensors", "--weights-only"]) == 0
    page = (Path(__file__).resolve().parent.parent / "docs" / "checkpoint.md").read_text()
    examples = re.findall(r"```py\n(.*?)```", page, re.S)
    assert len(examples) == 3
    scope = {"Model": book_torch.Model}
    for example in examples:
        exec(example, scope)
    assert scope["meta"]["adamw"]["t"] == 1 and "adamw.exp_avg.model_out_linear_layer.bias" in scope["tensors"]
    assert scope["h_params"] == H and len(scope["digest"]) == 64


def special_file(path):
    """A character device like /dev/null (root may make one), else a FIFO: either must survive."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return os.stat(path)


@pytest.mark.parametrize("direction", ["to-ours", "to-book"])
def test_output_that_is_a_device_is_refused_even_with_force(tmp_path, capsys, direction):
    """Issue 23.4: `convert m.ckpt /dev/null --force`, as root, replaced /dev/null with a file."""
    src = tmp_path / "src.ckpt"
    book_checkpoint(src) if direction == "to-ours" else save_state(src, Model(H))
    before = special_file(tmp_path / "null")
    assert main([str(src), str(tmp_path / "null"), "--force"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: the output \S+null is not a regular file \(a device, FIFO or socket\); "
                        r"writing would replace it, so choose another path\n", err), err
    after = os.stat(tmp_path / "null")
    assert (after.st_mode, after.st_rdev, after.st_ino) == (before.st_mode, before.st_rdev, before.st_ino)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "src.ckpt"]


@pytest.mark.parametrize("direction", ["to-ours", "to-book"])
@pytest.mark.parametrize("how", ["same-path", "hard-link", "symlink"])
def test_output_that_is_its_own_input_is_refused_even_with_force(tmp_path, capsys, direction, how):
    """Issue 23.5: `convert s.ckpt s.ckpt --force` replaced its input (AdamW state, step, settings lost)."""
    src = tmp_path / "s.ckpt"
    book_checkpoint(src) if direction == "to-ours" else save_state(src, Model(H))
    dst = {"same-path": src, "hard-link": tmp_path / "link.ckpt", "symlink": tmp_path / "sym.ckpt"}[how]
    if how == "hard-link":
        os.link(src, dst)
    elif how == "symlink":
        os.symlink(src, dst)
    before = src.read_bytes(), os.stat(src).st_mtime_ns
    assert main([str(src), str(dst), "--force"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(dst))} is the input {re.escape(str(src))}; writing would replace "
                        r"it, so choose another path\n", err), err
    assert (src.read_bytes(), os.stat(src).st_mtime_ns) == before
    assert os.path.samefile(dst, src) and not list(tmp_path.glob("*.tmp.*"))
