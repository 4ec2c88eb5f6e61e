"""nanograd/command.py: what every command prints can never crash it (issue 23.6, 23.7).

Each command runs as a user would, as a subprocess from the repository root, doing real
work on tiny files, with its standard output closed (`>&-`), full (`> /dev/full`), a pipe
whose reader has gone (`| head` after head exits) or unable to encode what it prints
(PYTHONIOENCODING=ascii, given a non-ASCII prompt or path).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanograd.command import GuardedStdout, run_command

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TEXT = " ".join(["the module returns a list of values from the file path and raises an error"] * 30) + "\n"
CHINESE = "销售"  # cl100k tokens; the escaped form \u9500\u552e is what an ASCII stdout gets


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A text file, a full-vocabulary checkpoint (so any prompt encodes) and a metrics file."""
    from transformer import Model
    from transformer.state import save_state
    folder = tmp_path_factory.mktemp(CHINESE)  # a non-ASCII folder: every command prints a path in it
    (folder / "data.txt").write_text(TEXT)
    save_state(folder / "m.ckpt", Model(dict(d_model=16, num_blocks=1, num_heads=2, context_length=8,
                                             max_token_value=100256)))
    (folder / "m.metrics.jsonl").write_text(json.dumps({"step": 0, "train_loss": 2.0, "valid_loss": 2.1}) + "\n")
    return folder


def command(name, files, tmp_path):
    """(argv, what it writes) of one successful run of each command, writing under a new
    non-ASCII folder in tmp_path."""
    out = tmp_path / CHINESE
    out.mkdir(exist_ok=True)
    tiny = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "8",
            "--batch-size", "2", "--eval-iters", "1", "--max-iters", "2", "--no-progress"]
    return {
        "train": (["train.py", *tiny, "--data", files / "data.txt", "--out", out / "t.ckpt"], out / "t.ckpt"),
        "inference": (["inference.py", "--ckpt", files / "m.ckpt", "--prompt", CHINESE, "--max-new-tokens", "3"], None),
        "convert": (["-m", "transformer.convert", files / "m.ckpt", out / "book.pt"], out / "book.pt"),
        "plot": (["-m", "transformer.plot", files / "m.metrics.jsonl", "--out", out / "loss.png"], out / "loss.png"),
        "inspect": (["-m", "transformer.inspect", "--ckpt", files / "m.ckpt", "--prompt", CHINESE,
                     "--out-dir", out / "maps"], out / "maps" / "overview.png"),
        "gradcheck": (["-m", "nanograd.gradcheck"], None),
    }[name]


COMMANDS = ["train", "inference", "convert", "plot", "inspect", "gradcheck"]


def run(argv, stdout, env=ENV, preexec_fn=None):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=300, preexec_fn=preexec_fn)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_closed_stdout_is_one_line_before_any_work(files, tmp_path, name):
    """`inference.py ... >&-` died in an AttributeError from the error handler itself; and with
    descriptor 1 free, the first file a command opened would have taken it."""
    argv, written = command(name, files, tmp_path)
    result = run(argv, stdout=None, preexec_fn=lambda: os.close(1))
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode() == ("error: standard output is closed; run the command with its output going "
                                      "to a terminal, a file or /dev/null\n")
    assert list((tmp_path / CHINESE).iterdir()) == []


@pytest.mark.parametrize("name", COMMANDS)
def test_a_full_stdout_finishes_the_work_and_says_so_in_one_line(files, tmp_path, name):
    """`> /dev/full` was an OSError traceback; now the command does its work (a training run saves)
    and then one line says the printed output was lost."""
    argv, written = command(name, files, tmp_path)
    with open("/dev/full", "w") as full:
        result = run(argv, stdout=full)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode() == ("error: cannot write to standard output (No space left on device); the "
                                      "command finished, but its printed output is lost\n")
    assert written is None or written.exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_a_pipe_whose_reader_left_ends_quietly(files, tmp_path, name):
    """`... | head -1`: the reader is gone (closed before the command starts, so no race)."""
    argv, _ = command(name, files, tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run(argv, stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 1 and result.stderr == b"", result.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_text_stdout_cannot_encode_is_escaped(files, tmp_path, name):
    """`PYTHONIOENCODING=ascii inference.py --prompt '销售'` was a UnicodeEncodeError traceback."""
    argv, written = command(name, files, tmp_path)
    result = run(argv, stdout=subprocess.PIPE, env={**ENV, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    out = result.stdout.decode("ascii")
    if name != "gradcheck":  # its table is ASCII: nothing to escape
        assert r"\u9500\u552e" in out, out
    assert written is None or written.exists()


def test_a_write_error_is_remembered_and_the_rest_dropped():
    class Full:
        def __init__(self):
            self.calls = 0

        def write(self, text):
            self.calls += 1
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    full = Full()
    stdout = GuardedStdout(full)
    assert stdout.write("one") == 3 and stdout.write("two") == 3
    stdout.flush()
    assert full.calls == 1 and stdout.failure.errno == 28


def test_run_command_restores_stdout_and_passes_the_exit_code(capsys):
    before = sys.stdout
    with pytest.raises(SystemExit) as exit:
        run_command(lambda: print("hello") or 3)
    assert exit.value.code == 3 and sys.stdout is before
    assert capsys.readouterr().out == "hello\n"


def test_every_command_ends_in_run_command():
    """The commands' last lines: a command that called sys.exit(main()) itself would miss all of this."""
    for path in ["train.py", "inference.py", "transformer/convert.py", "transformer/plot.py",
                 "transformer/inspect.py", "nanograd/gradcheck.py"]:
        tail = (REPO / path).read_text().rstrip().splitlines()[-1]
        assert re.fullmatch(r"\s+run_command\(main\)", tail), (path, tail)
