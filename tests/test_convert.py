"""python -m transformer.convert: the book's torch checkpoints to ours and back."""
import os
import pickle
import re
import stat

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
    crafted_book(tmp_path / "book.ckpt", edit)
    assert main([str(tmp_path / "book.ckpt"), str(tmp_path / "ours.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.ckpt"]


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
    dst = tmp_path / "new" / "deeper" / "out.ckpt"
    assert main([str(src), str(dst)]) == 0
    assert os.listdir(dst.parent) == ["out.ckpt"]  # no temp file left


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
    assert main([str(src), str(tmp_path / "out" / "m.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"cannot write .*m\.ckpt \(.*\); nothing was written there", err), err
    assert list((tmp_path / "out").iterdir()) == []


def test_without_torch_the_message_gives_the_pinned_install(tmp_path, monkeypatch, capsys):
    """Issue 13.8: the README pins torch; installing torch unpinned fetches whatever is newest."""
    save_state(tmp_path / "ours.ckpt", Model(H))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
    assert main([str(tmp_path / "ours.ckpt"), str(tmp_path / "book.ckpt")]) == 2
    assert capsys.readouterr().err == "error: converting needs PyTorch: pip install torch==2.13.0\n"
    assert not (tmp_path / "book.ckpt").exists()


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
