"""nanograd.exercise: the exercise is the reference with its gradient lines blanked; --check
names the first wrong line, every time, and passes the reference itself."""
import ast
import contextlib
import io
import pathlib
import re
import subprocess

import pytest

from nanograd import exercise
from nanograd.trace import KERNELS, make_case

ROOT = pathlib.Path(__file__).resolve().parent.parent


def filled_in(kernel):
    """The exercise with each blank put back as the reference's own line(s)."""
    text = exercise.exercise_text(kernel)
    backward = make_case(kernel).backward
    lines, _ = exercise.function_tree(backward)
    for statement in exercise.gradient_lines(backward):
        blank = exercise.blanked(lines, statement)
        assert blank in text
        text = text.replace(blank, "\n".join(lines[statement.lineno - 1:statement.end_lineno]), 1)
    return text


def run(argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = exercise.main(argv)
    return status, out.getvalue(), err.getvalue()


def check(tmp_path, kernel, text, name=None):
    path = tmp_path / f"{name or kernel}.py"
    path.write_text(text)
    return run([kernel, "--check", str(path)])


# Each gradient line of each reference, made wrong the way people get it wrong (a term
# dropped, a transpose, the wrong axis, a missing scale ...), and the variable --check
# must name.  Every line that the exercise blanks has a mutation here (tested below).
MUTATIONS = {
    "linear": [
        ("dout_rows = dout.reshape(-1, OUT)", "dout_rows = dout.reshape(OUT, -1).T", "dout_rows"),
        ("dx = dout @ W", "dx = -dout @ W", "dx"),
        ("dW = dout_rows.T @ x.reshape(-1, IN)", "dW = x.reshape(-1, IN).T @ dout_rows", "dW"),
        ("db = dout_rows.sum(axis=0)", "db = dout_rows.sum(axis=1)", "db"),
    ],
    "relu": [("dx = dout * (cache.out > 0)", "dx = dout * (cache.out >= 0)", "dx")],
    "dropout": [("dx = dout * cache.keep", "dx = dout", "dx")],
    "layernorm": [
        ("dw = (dout * xhat).reshape(-1, C)", "dw = dout.reshape(-1, C)", "dw"),
        ("db = dout.reshape(-1, C).sum(axis=0)", "db = dout.reshape(-1, C).mean(axis=0)", "db"),
        ("dxhat = dout * w", "dxhat = dout", "dxhat"),
        ("\n                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))", ")", "dx"),
    ],
    "attention": [
        ("dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)", "dy = dout.reshape(B, NH, T, hs)", "dy"),
        ("datt_drop = dy @ v.transpose(0, 1, 3, 2)", "datt_drop = (dy @ v.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)",
         "datt_drop"),
        ("dv = att_drop.transpose(0, 1, 3, 2) @ dy", "dv = att_drop @ dy", "dv"),
        ("datt = dropout_backward(datt_drop, dropout_cache)", "datt = datt_drop", "datt"),
        ("dpreatt = softmax_backward(datt, att)", "dpreatt = att * datt", "dpreatt"),
        ("dq = (dpreatt @ k) * scale", "dq = dpreatt @ k", "dq"),
        ("dk = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale", "dk = (dpreatt @ q) * scale", "dk"),
        ("merge_heads(dq), merge_heads(dk), merge_heads(dv)", "merge_heads(dq), merge_heads(dv), merge_heads(dk)",
         "dk_rows"),
        ("dWq = (dq_rows.T @ x_rows).reshape(NH, hs, C)", "dWq = (dq_rows.T @ x_rows).reshape(NH, C, hs)", "dWq"),
        ("dWk = (dk_rows.T @ x_rows)", "dWk = (dk_rows.T @ x_rows * scale)", "dWk"),
        ("dWv = (dv_rows.T @ x_rows)", "dWv = (dq_rows.T @ x_rows)", "dWv"),
        ("\n               + dv_rows @ Wv.reshape(NH * hs, C))", ")", "dx_rows"),
    ],
    "cross_entropy": [
        ("dlogits = probs.copy()", "dlogits = xp.zeros_like(probs)", "dlogits"),
        ("dlogits[xp.arange(N), targets] -= 1.0", "dlogits[:, targets] -= 1.0", "dlogits"),
        ("dlogits *= dloss / N", "dlogits *= dloss", "dlogits"),
    ],
    "embedding": [
        ("dW = xp.zeros((V, C), dtype=dout.dtype)", "dW = xp.ones((V, C), dtype=dout.dtype)", "dW"),
        ("scatter_add(dW, cache.idx.reshape(-1), dout.reshape(-1, C))",
         "dW[cache.idx.reshape(-1)] += dout.reshape(-1, C)", "dW"),
    ],
    "block": [
        ("dfc2_out = k.dropout_backward(dout, c.drop2)", "dfc2_out = dout", "dfc2_out"),
        ("k.linear_backward(dfc2_out, c.fc2)", "k.linear_backward(dout, c.fc2)", "drelu_out"),
        ("dfc1_out = k.relu_backward(drelu_out, c.relu)", "dfc1_out = drelu_out", "dfc1_out"),
        ("k.linear_backward(dfc1_out, c.fc1)", "k.linear_backward(drelu_out, c.fc1)", "dln2_out"),
        ("k.layernorm_backward(dln2_out, c.ln2)", "k.layernorm_backward(dln2_out, c.ln1)", "dx1"),
        ("dx1 += dout", "dx1 += dfc2_out", "dx1"),
        ("k.dropout_backward(dx1, c.drop1)", "k.dropout_backward(dout, c.drop1)", "dproj_out"),
        ("k.linear_backward(dproj_out, c.proj)", "k.linear_backward(dx1, c.proj)", "dattn_out"),
        ("k.attention_backward(dattn_out, c.attn)", "k.attention_backward(dproj_out, c.attn)", "dln1_out"),
        ("k.layernorm_backward(dln1_out, c.ln1)", "k.layernorm_backward(dln1_out, c.ln2)", "dx"),
        ("dx += dx1", "dx += dout", "dx"),
    ],
}


def test_every_blanked_line_has_a_mutation():
    assert set(MUTATIONS) == set(KERNELS)
    for kernel in KERNELS:
        assert len(MUTATIONS[kernel]) == len(exercise.gradient_lines(make_case(kernel).backward)), kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_exercise_is_the_reference_with_its_gradient_lines_blanked(kernel, tmp_path):
    text = exercise.exercise_text(kernel)
    backward = make_case(kernel).backward
    assert f"def {backward.__name__}(" in text
    assert backward.__doc__.strip().splitlines()[0] in text
    blanks = [line for line in text.splitlines() if re.search(r"(^|= )\.\.\.( |$)", line.strip())]
    assert len(blanks) == len(exercise.gradient_lines(backward))
    assert filled_in(kernel) != text
    status, out, err = check(tmp_path, kernel, text)  # as written: the first blank is named
    assert status == 1 and "is wrong: still blank" in out, out + err


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_reference_filled_back_in_passes(kernel, tmp_path):
    status, out, err = check(tmp_path, kernel, filled_in(kernel))
    assert status == 0, out + err
    assert "All right." in out and "WRONG" not in out


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_wrong_line_is_named(kernel, tmp_path):
    text = filled_in(kernel)
    docstrings_end = text.rindex('"""')  # mutate the code, not the docstring quoting it
    head, body = text[:docstrings_end], text[docstrings_end:]
    for i, (right, wrong, variable) in enumerate(MUTATIONS[kernel]):
        assert body.count(right) == 1, right
        status, out, err = check(tmp_path, kernel, head + body.replace(right, wrong), f"{kernel}_{i}")
        assert status == 1, (wrong, out + err)
        first = out.splitlines()[0]
        assert f": {variable} is wrong: " in first, (wrong, out)
        assert "see " in out


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_whole_body_level(kernel, tmp_path):
    """--whole blanks every line from the first gradient to the return; the reference's lines put back pass."""
    text = exercise.exercise_text(kernel, whole=True)
    backward = make_case(kernel).backward
    lines, definition = exercise.function_tree(backward)
    gradients = exercise.gradient_lines(backward)
    first = exercise.written_names(gradients[0])[0]
    status, out, _ = check(tmp_path, kernel, text, f"{kernel}_blank")
    assert status == 1 and out.startswith(f"{tmp_path / kernel}_blank.py: {first} is wrong: never set"), out
    returns = next(s for s in definition.body if isinstance(s, ast.Return)).lineno
    reference = "\n".join(lines[gradients[0].lineno - 1:returns - 1])
    blank = r"(    # Your lines.*\n)(    #.*\n)*    \.\.\."  # the list of gradients, then the `...`
    status, out, err = check(tmp_path, kernel, re.sub(blank, lambda _: reference, text))
    assert status == 0, out + err


def test_a_gradient_may_take_fewer_steps_than_the_reference(tmp_path):
    """cross_entropy's dlogits in one line instead of three: its last value is what counts."""
    text = exercise.exercise_text("cross_entropy", whole=True).replace(
        "    ...\n", "    dlogits = (probs - xp.eye(probs.shape[1])[targets]) * (dloss / N)  # (N, V)\n")
    assert check(tmp_path, "cross_entropy", text)[0] == 0
    status, out, _ = check(tmp_path, "cross_entropy", text.replace("* (dloss / N)", "* dloss"), "wrong")
    assert status == 1 and ": dlogits is wrong: max abs error" in out


def test_git_ignores_the_exercises():
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", "exercises/relu.py"], cwd=ROOT, timeout=30)
    assert result.returncode == 0


def test_an_exercise_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["relu"])[0] == 0
    path = tmp_path / "exercises" / "relu.py"
    path.write_text(path.read_text() + "# my work\n")
    status, out, err = run(["relu"])
    assert status == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert path.read_text().endswith("# my work\n")


def test_a_file_where_the_folder_goes_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exercises").write_text("mine")
    status, _, err = run(["relu"])
    assert status == 2 and "cannot make the folder exercises" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "exercises").read_text() == "mine"


def test_bad_input_gets_one_line_and_exit_2(tmp_path):
    def one_line(argv):
        status, out, err = run(argv)
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert "unknown kernel" in one_line(["softmax"])
    assert "is not a file" in one_line(["relu", "--check", str(tmp_path / "missing.py")])
    (tmp_path / "other.py").write_text("def something_else(dout, cache):\n    return dout\n")
    assert "has no function relu_backward" in one_line(["relu", "--check", str(tmp_path / "other.py")])
    (tmp_path / "broken.py").write_text("def relu_backward(dout, cache:\n")
    assert "could not be imported" in one_line(["relu", "--check", str(tmp_path / "broken.py")])
    (tmp_path / "raises.py").write_text("def relu_backward(dout, cache):\n    dx = dout @ dout  # (...)\n"
                                        "    return dx\n")
    assert "raised ValueError" in one_line(["relu", "--check", str(tmp_path / "raises.py")])
    text = filled_in("linear").replace("return dx, dW, db", "return dx, dW")
    (tmp_path / "two.py").write_text(text)
    assert "returned 2 gradient(s)" in one_line(["linear", "--check", str(tmp_path / "two.py")])


def test_a_blank_that_cannot_run_is_named_with_its_section(tmp_path):
    """`dx1 += ...` raises (an array plus Ellipsis): still blank, and it is dx1's second value, the residual's."""
    status, out, _ = check(tmp_path, "block", filled_in("block").replace("dx1 += dout", "dx1 += ..."))
    assert status == 1 and ": dx1 is wrong: still blank" in out
    assert out.strip().endswith(exercise.SECTIONS["block"][("dx1", 1)])


def test_a_wrong_return_order_fails_the_gradcheck(tmp_path):
    text = filled_in("layernorm").replace("return dx, dw, db", "return dx, db, dw")
    status, out, _ = check(tmp_path, "layernorm", text)
    assert status == 1 and "check the return line" in out


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_section_pointer_exists():
    for kernel, sections in exercise.SECTIONS.items():
        for where in sections.values():
            path, _, anchor = where.partition("#")
            page = ROOT / path.split(" ")[0]
            assert page.is_file(), where
            if anchor:
                headings = [slug(h) for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)]
                assert anchor in headings, where
