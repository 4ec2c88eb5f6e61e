"""nanograd.trace: every line of every plain backward (and the block's), each gradient against torch's."""
import contextlib
import io
import pathlib
import re
import sys

import numpy as np
import pytest

from nanograd import trace as tracer
from nanograd.trace import KERNELS, TOLERANCE, trace

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_gradient_on_every_line_agrees_with_torch(kernel):
    pytest.importorskip("torch")
    rows = trace(kernel)
    gradients = [v for row in rows for v in row.values if v.name.startswith("d") and isinstance(v.value, np.ndarray)]
    assert len(gradients) >= 2
    for v in gradients:
        assert v.oracle, f"{v.name} has no torch tensor to compare with"
        if v.completed_on is None:
            assert v.max_rel <= TOLERANCE, (v.name, v.max_rel)
        else:  # a partial gradient is completed by a later line, itself checked
            assert any(row.line == v.completed_on and v.name in [w.name for w in row.values] for row in rows)
    returned = rows[-1]
    assert returned.source.lstrip().startswith("return")
    assert len(returned.values) == len(tracer.make_case(kernel).wrt)


def test_the_residual_fan_out_shows_as_a_partial_then_complete():
    pytest.importorskip("torch")
    values = [(row.source.strip(), v) for row in trace("block") for v in row.values if v.name == "dx1"]
    (first_source, first), (second_source, second) = values
    assert first_source.startswith("dx1, dln2_w, dln2_b = ") and second_source.startswith("dx1 += dout")
    assert first.completed_on is not None and first.max_rel > 0.1  # the branch's part alone is far off
    assert second.completed_on is None and second.max_rel <= TOLERANCE


def test_in_place_changes_are_seen_and_copied():
    """cross_entropy's dlogits is built by three lines, two of them in place: three values, each kept as it was."""
    pytest.importorskip("torch")
    dlogits = [v for row in trace("cross_entropy") for v in row.values if v.name == "dlogits"]
    assert len(dlogits) == 4  # three lines, and the return
    assert not np.array_equal(dlogits[0].value, dlogits[1].value)
    assert [v.completed_on is None for v in dlogits] == [False, False, True, True]


def printed(kernel, **kwargs):
    out = io.StringIO()
    ok = tracer.print_trace(kernel, file=out, **kwargs)
    return ok, out.getvalue()


def test_without_torch_it_says_so_and_checks_the_final_gradients(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    ok, text = printed("layernorm")
    assert ok
    assert len([line for line in text.splitlines() if "torch is not installed" in line]) == 1
    assert "dxhat      (2, 5, 8)" in text  # shapes still
    assert re.search(r"^dx: finite differences .*: ok$", text, re.M)


def test_the_seed_changes_the_inputs():
    pytest.importorskip("torch")
    assert not np.array_equal(trace("relu", seed=0)[0].values[0].value, trace("relu", seed=1)[0].values[0].value)


def test_unknown_kernel_is_one_line_and_exit_2(capsys):
    assert tracer.main(["softmax"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown kernel 'softmax'" in err


NUMBER = re.compile(r"-?\d+\.\d+(e[-+]\d+)?|-?\d+e[-+]\d+")


def quoted_commands(page):
    """(command, its quoted output lines) for each indented block of page that starts `$ python -m ...`."""
    for block in re.findall(r"(?:^    .*\n|^\n)+", page.read_text(), re.M):
        lines = [line[4:] for line in block.strip("\n").split("\n")]
        if lines[0].startswith("$ python -m nanograd."):
            yield lines[0][2:], lines[1:]


def appears_in(quoted, real):
    """Each run of quoted lines between `...` lines is a run of real's lines, in order; numbers aside
    (rounding may change their last digits from one machine to the next)."""
    quoted, real = [NUMBER.sub("#", line) for line in quoted], [NUMBER.sub("#", line) for line in real]
    runs, start = [[]], 0
    for line in quoted:
        runs.append([]) if line == "..." else runs[-1].append(line)
    for run in filter(None, runs):
        found = [i for i in range(start, len(real) - len(run) + 1) if real[i:i + len(run)] == run]
        if not found:
            return False
        start = found[0] + len(run)
    return True


def test_the_output_quoted_in_the_docs_is_real(tmp_path, monkeypatch):
    """docs/exercises.md quotes trace and --check output: the same commands print it still."""
    pytest.importorskip("torch")
    from nanograd import exercise
    from test_exercise import filled_in
    commands = list(quoted_commands(ROOT / "docs" / "exercises.md"))
    assert any("nanograd.trace" in c for c, _ in commands) and any("--check" in c for c, _ in commands)
    monkeypatch.chdir(tmp_path)
    for command, quoted in commands:
        module, *argv = command.split()[2:]
        if "--check" in argv:  # the page's example: the exercise filled in, but for a wrong dxhat
            path = tmp_path / "exercises" / f"{argv[0]}.py"
            path.parent.mkdir(exist_ok=True)
            path.write_text(filled_in(argv[0]).replace("dxhat = dout * w  #", "dxhat = dout  #"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            {"nanograd.trace": tracer, "nanograd.exercise": exercise}[module].main(argv)
        assert appears_in(quoted, out.getvalue().rstrip("\n").split("\n")), command
