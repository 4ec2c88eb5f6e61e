"""transformer/errors.py: every command's flags are spelled in full, and Ctrl-C is one line."""
import importlib
import sys
from pathlib import Path

import pytest

from transformer.errors import OneLineParser, run_command

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # train.py and inference.py are scripts at the repository root
    sys.path.insert(0, str(REPO))

# (module with main(argv), an abbreviation of one of its flags, the full flag it abbreviates)
ABBREVIATIONS = [
    ("train", ["--lr", "0.01"], "--lr-schedule"),
    ("inference", ["--temp", "0"], "--temperature"),
    ("transformer.plot", ["m.metrics.jsonl", "--o", "x.png"], "--out"),
    ("transformer.inspect", ["--out", "x"], "--out-dir"),
    ("transformer.convert", ["a.ckpt", "b.ckpt", "--f"], "--force"),
    ("nanograd.gradcheck", ["--see", "1"], "--seed"),
    ("transformer.gradcheck", ["--see", "1"], "--seed"),
]


@pytest.mark.parametrize("module, argv, full", ABBREVIATIONS, ids=[m for m, _, _ in ABBREVIATIONS])
def test_no_command_accepts_an_abbreviated_flag(module, argv, full, capsys):
    """Issue 13.2: `train.py --lr 0.01` was read as --lr-schedule; now it is an unknown flag."""
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(argv[-2:] if argv[-1][0] != '-' else argv[-1:])}" in err, err
    assert full not in err.splitlines()[-1]


def test_one_line_parser_still_takes_full_flags():
    parser = OneLineParser(prog="p")
    parser.add_argument("--lr-schedule")
    assert parser.parse_args(["--lr-schedule", "cosine"]).lr_schedule == "cosine"


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit:
        run_command(main)
    assert exit.value.code == 130
    assert capsys.readouterr().err == "Interrupted (Ctrl-C).\n"
