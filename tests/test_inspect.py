"""python -m transformer.inspect: one attention-map PNG per block and head."""
import numpy as np

from transformer import Model
from transformer.inspect import attention_maps, main
from transformer.state import save_state

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
