"""python -m transformer.inspect: one attention-map PNG per block and head, and the overview grid."""
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transformer import Model
from transformer.inspect import OVERVIEW, OVERVIEW_DPI, attention_maps, main, overview_figure
from transformer.state import save_state
from transformer.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
H = dict(d_model=16, num_blocks=2, num_heads=2, context_length=8, dropout=0.1, max_token_value=1000)


def test_maps_are_causal_softmax_rows():
    maps = attention_maps(Model(H, dtype="float64"), np.array([5, 6, 7, 5, 9]))
    assert len(maps) == 2
    for heads in maps:
        assert heads.shape == (2, 5, 5)
        np.testing.assert_allclose(heads.sum(axis=-1), 1.0, rtol=1e-12)
        assert np.all(np.triu(heads, k=1) == 0)  # the causal mask
        assert np.all(heads[:, 0, 0] == 1.0)  # the first position can only see itself


def test_writes_one_png_per_head_and_the_overview(tmp_path, capsys):
    save_state(tmp_path / "m.ckpt", Model(H))
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "a b c", "--out-dir", str(tmp_path / "att")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert pngs == sorted([f"block{i}_head{h}.png" for i in range(2) for h in range(2)] + [OVERVIEW])
    for name in pngs:
        data = (tmp_path / "att" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
    assert f"Wrote 4 attention maps (3 tokens) and {OVERVIEW}" in capsys.readouterr().out
    maps = [np.tril(np.ones((2, 3, 3)))] * 2  # 2 blocks of 2 heads, 3 tokens: the figure's size depends on nothing else
    width, height = overview_figure(maps, ["a", " b", " c"]).get_size_inches() * OVERVIEW_DPI
    with Image.open(tmp_path / "att" / OVERVIEW) as image:
        assert image.size == (round(width), round(height))


def causal_maps(rng, NB, NH, T):
    """NB blocks of NH random (T, T) causal softmax matrices."""
    scores = rng.standard_normal((NB, NH, T, T)) + np.triu(np.full((T, T), -np.inf), k=1)  # (NB, NH, T, T)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))  # (NB, NH, T, T)
    return list(weights / weights.sum(axis=-1, keepdims=True))  # NB x (NH, T, T)


@pytest.mark.parametrize("NB, NH, T", [(2, 2, 3), (3, 1, 5), (1, 4, 40)])
def test_overview_has_a_labelled_panel_per_block_and_head(NB, NH, T):
    """Rows are blocks, columns are heads; each panel shows its own map and says which it is."""
    maps = causal_maps(np.random.default_rng(NB * 10 + NH), NB, NH, T)
    fig = overview_figure(maps, [f"t{i}" for i in range(T)])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == NB * NH
    seen = set()
    for ax in panels:
        spec = ax.get_subplotspec()
        assert spec.get_geometry()[:2] == (NB, NH)
        i, h = spec.rowspan.start, spec.colspan.start
        np.testing.assert_array_equal(ax.images[0].get_array(), maps[i][h])
        assert ax.get_title() == f"block {i}, head {h}"
        seen.add((i, h))
    assert len(seen) == NB * NH
    tick_labels = [label.get_text() for label in panels[-1].get_xticklabels()]  # the bottom-right panel
    assert tick_labels == ([f"t{i}" for i in range(T)] if T <= 32 else [])


def test_help_describes_each_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    options = text[text.index("options:"):]
    defaults = {"--ckpt": "model/model.ckpt", "--prompt": "Return the number of items in the list.",
                "--out-dir": "attention", "--backend": "numpy"}
    starts = [options.index(f"{flag} ") for flag in defaults] + [len(options)]
    for (flag, default), start, end in zip(defaults.items(), starts, starts[1:]):
        section = options[start:end].strip()  # "--flag METAVAR what it is (default: ...)"
        assert section.endswith(f"(default: {default})"), section
        assert len(section.split()) >= 3 + len(default.split()) + 3, section  # a description of a few words


def test_bad_checkpoint_and_unknown_prompt_tokens_get_one_line(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out-dir", str(tmp_path / "att")]) == 2
    save_state(tmp_path / "m.ckpt", Model(H))  # vocabulary 1000: most tokens are out of it
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "Pneumonoultramicroscopic",
                 "--out-dir", str(tmp_path / "att")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "att").exists()


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    """--out-dir naming an existing file: one line, exit 2, the file untouched (was a traceback)."""
    save_state(tmp_path / "m.ckpt", Model(H))
    (tmp_path / "notes.txt").write_text("my notes\n")
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "a b c", "--out-dir", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: --out-dir .*notes\.txt is a file, not a folder; give a folder \(made if missing\)\n", err)
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def drop_dac_override():
    """In the child: root loses CAP_DAC_OVERRIDE, so a read-only folder stops it as it stops anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_out_dir_is_one_line(tmp_path):
    save_state(tmp_path / "m.ckpt", Model(H))
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    kwargs = {}
    if os.geteuid() == 0:
        try:
            subprocess.run(["true"], preexec_fn=drop_dac_override, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"running as root without CAP_SETPCAP, so a read-only folder cannot be enforced ({e})")
        kwargs["preexec_fn"] = drop_dac_override
    result = subprocess.run([sys.executable, "-m", "transformer.inspect", "--ckpt", str(tmp_path / "m.ckpt"),
                             "--prompt", "a b c", "--out-dir", str(folder)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, **kwargs)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(r"error: --out-dir .*readonly is not writable \(Permission denied\); "
                        r"choose another --out-dir\n", result.stderr), result.stderr
    assert list(folder.iterdir()) == []


# ---- sizes and files from earlier runs (issue 23.3, 23.11) ------------------------------------

WORDS = "the module returns a list of values from the file path and raises an error".split()
LONG = dict(d_model=16, num_blocks=1, num_heads=2, dropout=0.0,
            max_token_value=1 + max(get_tokenizer().encode_ordinary(" ".join(WORDS))))  # logits stay small
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NANOGRAD_MEMORY_LIMIT": str(2 * 10**9)}


def prompt_of(tokens):
    """A prompt of exactly `tokens` cl100k tokens (one per word)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


@pytest.mark.parametrize("tokens", [1000, 3000])
def test_a_long_prompt_draws_in_bounded_memory_and_time(tmp_path, run_measured, tokens):
    """Issue 23.3: context 1024 and a 1,000-token prompt took 22.6 GB and 245 s (each head's image
    grew with the square of the prompt); at 3000 a MemoryError.  Now the images stop growing at
    LABELLED_TOKENS and the run stays far inside the 2 GB budget the memory check allows."""
    save_state(tmp_path / "m.ckpt", Model({**LONG, "context_length": tokens}))
    result = run_measured([sys.executable, "-m", "transformer.inspect", "--ckpt", str(tmp_path / "m.ckpt"),
                           "--prompt", prompt_of(tokens), "--out-dir", str(tmp_path / "att")],
                          timeout=240, cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stderr
    assert f"Wrote 2 attention maps ({tokens} tokens)" in result.stdout
    assert result.max_rss_mb < 1000, f"peak {result.max_rss_mb:.0f} MB"
    print(f"{tokens} tokens: peak {result.max_rss_mb:.0f} MB, {result.seconds:.1f} s")
    for png in (tmp_path / "att").iterdir():
        with Image.open(png) as image:
            assert max(image.size) <= 2000, (png.name, image.size)


def test_drawing_past_the_memory_budget_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch):
    """The same prompt, with a budget below what drawing it takes: one line with the estimate,
    before the folder is made."""
    monkeypatch.setenv("NANOGRAD_MEMORY_LIMIT", str(50 * 10**6))
    save_state(tmp_path / "m.ckpt", Model({**LONG, "context_length": 1000}))
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--prompt", prompt_of(1000),
                 "--out-dir", str(tmp_path / "att")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: drawing the attention maps of 1000 tokens \(num_blocks 1, num_heads 2, images of up to "
                        r"[\d.]+ million pixels\) needs about [\d.]+ MB of memory but this machine has 50\.0 MB "
                        r"available; shorten --prompt or use a machine with more memory\n", err), err
    assert not (tmp_path / "att").exists()


def test_an_overview_png_that_is_not_a_png_is_not_replaced(tmp_path, capsys):
    """Issue 23.11: inspect replaced a non-PNG overview.png (plot refuses the same case).  Every
    image is checked before any is drawn, so nothing at all is written."""
    save_state(tmp_path / "m.ckpt", Model(H))
    (tmp_path / "att").mkdir()
    (tmp_path / "att" / OVERVIEW).write_text("my notes\n")
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "a b c", "--out-dir", str(tmp_path / "att")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*overview\.png exists and is not a PNG; drawing would replace it, "
                        r"so choose another path\n", err), err
    assert [p.name for p in (tmp_path / "att").iterdir()] == [OVERVIEW]
    assert (tmp_path / "att" / OVERVIEW).read_text() == "my notes\n"


def test_another_model_s_maps_left_in_the_folder_are_named(tmp_path, capsys):
    """Issue 23.11: a previous model with more blocks left block3_head0.png and others beside the
    new maps without a word.  They stay (not ours to delete), and the summary names them."""
    save_state(tmp_path / "big.ckpt", Model({**H, "num_blocks": 4}))
    save_state(tmp_path / "small.ckpt", Model(H))
    argv = ["--prompt", "a b c", "--out-dir", str(tmp_path / "att")]
    assert main(["--ckpt", str(tmp_path / "big.ckpt"), *argv]) == 0
    assert "older" not in capsys.readouterr().out
    assert main(["--ckpt", str(tmp_path / "small.ckpt"), *argv]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Note: .*att/ also holds 4 older map\(s\) this model has no block or head for "
                     r"\(block2_head0\.png, block2_head1\.png, block3_head0\.png, \.\.\.\)", out), out
    assert len(list((tmp_path / "att").iterdir())) == 9
