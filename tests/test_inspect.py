"""python -m transformer.inspect: one attention-map PNG per block and head."""
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transformer import Model
from transformer.inspect import attention_maps, main
from transformer.state import save_state

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


def test_writes_one_png_per_head(tmp_path, capsys):
    save_state(tmp_path / "m.ckpt", Model(H))
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "a b c", "--out-dir", str(tmp_path / "att")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert pngs == [f"block{i}_head{h}.png" for i in range(2) for h in range(2)]
    for name in pngs:
        data = (tmp_path / "att" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
    assert "Wrote 4 attention maps" in capsys.readouterr().out


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
