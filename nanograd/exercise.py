"""Write a backward pass yourself, and be told which line is wrong.

    python -m nanograd.exercise layernorm            # writes exercises/layernorm.py
    python -m nanograd.exercise layernorm --check    # checks it, line by line

The exercise is the reference backward (nanograd/<kernel>.py) with the
right-hand side of every gradient line blanked to `...`: the same name,
signature, docstring, cache unpacking and shape comments, made from the
reference's source so it cannot drift from it.  --whole is the harder
level: every line from the first gradient to the return blank, the
gradients to set listed by name.  An existing exercise file is never
overwritten: it is your work.

--check runs your function and the reference on the same small float64
inputs, one statement at a time (nanograd.trace), and compares each
variable the reference sets with yours, in order.  The first wrong one is
named, with its line, the shape or the largest error (index, expected,
got) and the section of the derivation page that covers it: exit 1.  When
every line is right, your function's gradients go through the
finite-difference check of nanograd.gradcheck: exit 0.
"""
import ast
import importlib.util
import pathlib
import re
import sys

import numpy as np

from .errors import UserError
from .gradcheck import check_kernel
from .trace import (KERNELS, Raised, flatten, function_tree, make_case, run_line_by_line, statement_source,
                    upstream_gradient)

# A right line differs from the reference only by rounding: ~1e-16 relative in float64,
# times a few dozen operations.  A wrong one is off by O(1).
RTOL, ATOL = 1e-8, 1e-10

# Where each gradient is derived: the section of docs/ (or the file) that covers its line.
# A key (name, n) is name's n-th value (0 first), for a gradient two lines build.
LINEAR = "docs/linear.md#the-three-gradients"
LAYERNORM_EASY = "docs/layernorm.md#the-easy-part-w-b-and-dxhat"
LAYERNORM_DX = "docs/layernorm.md#the-hard-part-xhat-depends-on-all-of-x"
DROPOUT = "docs/attention.md#dropout-on-the-weights"
PROJECTIONS = "docs/attention.md#the-three-projections-and-why-dx-has-three-terms"
SECTIONS = {
    "linear": dict(dout_rows=LINEAR, dx=LINEAR, dW=LINEAR, db=LINEAR),
    "relu": dict(dx="nanograd/relu.py (relu_backward's docstring)"),
    "dropout": dict(dx=DROPOUT),
    "layernorm": dict(dw=LAYERNORM_EASY, db=LAYERNORM_EASY, dxhat=LAYERNORM_EASY, dx=LAYERNORM_DX),
    "attention": dict(dy="docs/attention.md#y--ã-v", datt_drop="docs/attention.md#y--ã-v",
                      dv="docs/attention.md#y--ã-v", datt=DROPOUT,
                      dpreatt="docs/attention.md#applying-it-to-the-upstream-gradient",
                      dq="docs/attention.md#the-scores", dk="docs/attention.md#the-scores",
                      dq_rows=PROJECTIONS, dk_rows=PROJECTIONS, dv_rows=PROJECTIONS, dWq=PROJECTIONS,
                      dWk=PROJECTIONS, dWv=PROJECTIONS, dx_rows=PROJECTIONS),
    "cross_entropy": dict(dlogits="docs/cross_entropy.md#the-gradient-step-by-step"),
    "embedding": {"dW": "docs/embedding.md#the-lookup-is-a-matrix-product",
                  ("dW", 1): "docs/embedding.md#why-dwidx--dout-is-wrong"},
    "block": {"dfc2_out": DROPOUT, "drelu_out": LINEAR, "dfc2_W": LINEAR, "dfc2_b": LINEAR,
              "dfc1_out": "nanograd/relu.py (relu_backward's docstring)", "dln2_out": LINEAR, "dfc1_W": LINEAR,
              "dfc1_b": LINEAR, "dx1": LAYERNORM_DX, ("dx1", 1): PROJECTIONS, "dln2_w": LAYERNORM_EASY,
              "dln2_b": LAYERNORM_EASY, "dproj_out": DROPOUT, "dattn_out": LINEAR, "dproj_W": LINEAR,
              "dproj_b": LINEAR, "dln1_out": PROJECTIONS, "dWq": PROJECTIONS, "dWk": PROJECTIONS,
              "dWv": PROJECTIONS, "dx": LAYERNORM_DX, ("dx", 1): PROJECTIONS, "dln1_w": LAYERNORM_EASY,
              "dln1_b": LAYERNORM_EASY},
}


# --- Writing the exercise ------------------------------------------------------------------

def is_gradient(name):
    """A gradient is d + the forward's name (dx, dpreatt, dfc1_out), by the project's naming rule."""
    return name.startswith("d")


def written_names(statement):
    """The names a statement assigns or fills in place: `dW[i] -= 1` writes dW, so does `scatter_add(dW, ...)`."""
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
        return [a.id for a in statement.value.args if isinstance(a, ast.Name)]
    targets = statement.targets if isinstance(statement, ast.Assign) else \
        [statement.target] if isinstance(statement, ast.AugAssign) else []
    names = []
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.append(node.id)
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
                names.append(node.value.id)
    return names


def gradient_lines(function):
    """The statements of function that write a gradient, in order; unpacking the cache never does
    (its fields are the forward's names, even dropout_cache)."""
    _, definition = function_tree(function)
    return [s for s in ast.walk(definition) if isinstance(s, (ast.Assign, ast.AugAssign, ast.Expr))
            and any(is_gradient(n) for n in written_names(s))
            and not (isinstance(s, ast.Assign) and isinstance(s.value, ast.Name) and s.value.id == "cache")]


def blanked(lines, statement):
    """statement as one line with its right-hand side `...`, keeping the left side and the last line's comment."""
    first = lines[statement.lineno - 1]
    indent = first[:len(first) - len(first.lstrip())]
    if isinstance(statement, ast.Expr):  # a call that fills a gradient in place: all of it is the answer
        left = f"...  # fill {', '.join(n for n in written_names(statement) if is_gradient(n))} in place"
        return indent + left
    target_end = (statement.targets[-1] if isinstance(statement, ast.Assign) else statement.target).end_col_offset
    operator = first[target_end:statement.value.col_offset].strip().rstrip("(").strip()  # = or -= ...
    left = f"{first[:target_end]} {operator} "
    last = lines[statement.end_lineno - 1]
    comment = last[last.index("#"):] if "#" in last[statement.end_col_offset:] else ""
    return f"{left}...{'  ' + comment if comment else ''}"


def imports(function):
    """`from module import name` lines for the names function takes from its module (merge_heads ...)."""
    _, definition = function_tree(function)
    used = {n.id for n in ast.walk(definition) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    by_module = {}
    for name in sorted(used):
        value = function.__globals__.get(name)
        if value is not None and hasattr(value, "__module__") and not isinstance(value, type(np)):
            by_module.setdefault(value.__module__, []).append(name)
    return [f"from {module} import {', '.join(names)}" for module, names in sorted(by_module.items())]


def whole_body_blanked(lines, gradients):
    """The lines from the first gradient line to the return as one `...`, after a list of the gradients to set."""
    first = lines[gradients[0].lineno - 1]
    indent = first[:len(first) - len(first.lstrip())]
    wanted = []
    for statement in gradients:
        last = lines[statement.end_lineno - 1]
        comment = last[last.index("#"):] if "#" in last[statement.end_col_offset:] else ""
        names = ", ".join(n for n in written_names(statement) if is_gradient(n))
        wanted.append(f"{indent}#     {names}  {comment}".rstrip())
    return [f"{indent}# Your lines.  Set these gradients, in this order, with these names; --check",
            f"{indent}# compares each with the reference's (a name listed twice: the reference builds",
            f"{indent}# it in two steps, a partial then the whole; you may take fewer):",
            *wanted, f"{indent}..."]


def exercise_text(kernel, whole=False):
    """The exercise module for kernel, made from the reference backward's source.

    whole: the harder level, every line from the first gradient to the return blank.
    """
    backward = make_case(kernel).backward
    lines, definition = function_tree(backward)
    body = lines[definition.lineno - 1:definition.end_lineno]
    gradients = gradient_lines(backward)
    if whole:
        start = gradients[0].lineno - definition.lineno
        end = next(s for s in definition.body if isinstance(s, ast.Return)).lineno - definition.lineno
        body[start:end] = whole_body_blanked(lines, gradients)
    else:
        for statement in reversed(gradients):  # from the end, so earlier line numbers hold
            start, end = statement.lineno - definition.lineno, statement.end_lineno - definition.lineno
            body[start:end + 1] = [blanked(lines, statement)]
    source = pathlib.Path(backward.__code__.co_filename).name
    task = ("Replace the `...` with your lines, each gradient named as listed:" if whole else
            "Replace each `...` with the right-hand side that computes the gradient on its\nleft:")
    header = f'''"""Exercise: write {backward.__name__} yourself (the reference: nanograd/{source}).

{task} d + the forward's name, so dxhat is d loss / d xhat.  The forward is in
nanograd/{source}; docs/exercises.md says how to practise.  Check your lines
(the first wrong one is named) with

    python -m nanograd.exercise {kernel} --check

`python -m nanograd.exercise {kernel}` wrote this file and never overwrites it.
"""
'''
    return "\n".join([header.rstrip("\n"), *imports(backward), "", "", *body]) + "\n"


def write_exercise(kernel, path, whole=False):
    """Write kernel's exercise to path, refusing to replace an existing file (the learner's work)."""
    text = exercise_text(kernel, whole)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {path.parent} for {path.name} ({e.strerror}).") from None
    try:
        with open(path, "x") as f:  # x: only if there is no such file yet
            f.write(text)
    except FileExistsError:
        raise UserError(f"{path} already exists and may hold your work, so it is left as it is; check it with "
                        f"python -m nanograd.exercise {kernel} --check {path}, or delete it to start "
                        f"over.") from None
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}).") from None


# --- Checking it ---------------------------------------------------------------------------

def load_function(path, name, kernel):
    """The function called name in the Python file at path; UserError when it is not there."""
    if not path.is_file():
        raise UserError(f"{path} is not a file; write it first with python -m nanograd.exercise {kernel}.")
    spec = importlib.util.spec_from_file_location(f"exercise_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise UserError(f"{path} could not be imported{where}: {type(e).__name__}: {e}.") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{path} has no function {name}; the exercise's function keeps the reference's name.")
    return function


def values_in_order(steps):
    """[(line, name, n, value)]: each value a step set, n counting the values name took before."""
    taken, values = {}, []
    for step in steps:
        for name, value in step.changed.items():
            values.append((step.line, name, taken.get(name, 0), value))
            taken[name] = taken.get(name, 0) + 1
    return values


def difference(expected, got):
    """None when got equals expected up to rounding, else a sentence saying how it differs."""
    if got is Ellipsis:
        return "still blank (`...`)"
    if not isinstance(got, np.ndarray):
        return f"a {type(got).__name__}, not an array of shape {expected.shape}"
    if got.shape != expected.shape:
        return f"shape {got.shape}, expected {expected.shape}"
    error = np.abs(got - expected)  # expected's shape
    excess = np.where(np.isnan(error), np.inf, error - (ATOL + RTOL * np.abs(expected)))
    if (excess <= 0).all():
        return None
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    return (f"max abs error {np.nanmax(np.where(np.isnan(error), np.inf, error)):.3g} "
            f"at index {tuple(int(i) for i in worst)}, expected {expected[worst]:.6g}, got {got[worst]:.6g}")


def first_wrong(reference_values, learner_values, finished=True):
    """(line in your file or None, name, n, why) of the first value that differs; None when all agree
    (or, when your function raised before finishing, when all it set before agree).

    The n-th value you give a name is compared with the reference's n-th; a gradient you build
    in another number of steps than the reference is compared by its last value alone.
    """
    yours, count, reference_count = {}, {}, {}
    for line, name, n, value in learner_values:
        yours[(name, n)], count[name] = (line, value), n + 1
    for _, name, n, _ in reference_values:
        reference_count[name] = n + 1
    for _, name, n, expected in reference_values:
        if not isinstance(expected, np.ndarray):
            continue  # shapes and settings (B, T, C, xp) are not the exercise
        if name not in count:
            if not is_gradient(name):
                continue  # you may rebuild forward values (xhat ...) under other names, or inline
            if not finished:
                return None
            return None, name, n, "never set"
        if not finished or count[name] == reference_count[name]:
            if (name, n) not in yours:
                return None  # your function raised before it got here
        elif n + 1 < reference_count[name]:
            continue  # a partial value of the reference's, built in another number of steps by you
        else:
            n = count[name] - 1  # your last value against the reference's last
        line, got = yours[(name, n)]
        why = difference(expected, got)
        if why is not None:
            return line, name, n, why
    return None


def check(kernel, path, seed=0, file=None):
    """Check path's backward against the reference; prints the verdict, returns the exit status (0 or 1)."""
    file = sys.stdout if file is None else file
    case = make_case(kernel, seed)
    name = case.backward.__name__
    learner = load_function(path, name, kernel)
    lines = path.read_text().splitlines()

    def run(backward):
        inputs = [a.copy() for a in case.inputs]  # fresh, so neither run can change the other's
        out, cache = case.forward(*inputs)
        return run_line_by_line(backward, upstream_gradient(out, seed), cache)

    reference_steps, reference_result = run(case.backward)
    raised = None
    try:
        steps, result = run(learner)
    except Raised as e:
        raised, steps = e, e.steps
    # A function that raises at its return (a gradient never set: NameError) has set all it was going to.
    finished = raised is None or (raised.line and lines[raised.line - 1].strip().startswith("return"))
    wrong = first_wrong(values_in_order(reference_steps), values_in_order(steps), finished)
    if wrong is None and raised is not None:
        source = lines[raised.line - 1].strip() if raised.line else "?"
        if source.split("#")[0].rstrip().endswith("..."):  # `a, b = ...` or `dx += ...` cannot run
            variable = re.match(r"\w+", source).group()  # the first name it sets
            n = sum(1 for _, set_name, _, _ in values_in_order(steps) if set_name == variable)
            wrong = raised.line, variable, n, "still blank (`...`)"
        else:
            raise UserError(f"{path}:{raised.line}: {name} raised {raised} (in `{source}`).")
    if wrong is not None:
        line, variable, n, why = wrong
        where = f"{path}:{line}" if line else str(path)
        print(f"{where}: {variable} is wrong: {why}", file=file)
        if line:
            source = statement_source(learner, line).split("\n")
            indent = len(source[0]) - len(source[0].lstrip())
            print("\n".join("    " + text[indent:] for text in source), file=file)
        nth = "" if n == 0 else f" (value {n + 1}: an earlier line set it first)"
        section = SECTIONS[kernel].get((variable, n), SECTIONS[kernel].get(variable, f"docs/{kernel}.md"))
        print(f"{variable}{nth}: see {section}", file=file)
        return 1
    expected_count, got = len(flatten(reference_result)), flatten(result)
    if len(got) != expected_count:
        raise UserError(f"{path}: {name} returned {len(got)} gradient(s); the reference returns "
                        f"{expected_count}, one per input: {', '.join('d' + case.names[i] for i in case.wrt)}.")
    gradients = dict.fromkeys(n for _, n, _, value in values_in_order(reference_steps)
                              if is_gradient(n) and isinstance(value, np.ndarray))
    print(f"{', '.join(gradients)}: each line agrees with the reference (float64, seed {seed}).", file=file)
    rows = check_kernel(kernel, case.forward, lambda dout, cache: tuple(flatten(learner(dout, cache))),
                        [a.copy() for a in case.inputs], case.wrt, [case.names[i] for i in case.wrt], seed=seed)
    for r in rows:
        print(f"d{r.input}: finite differences, max abs err {r.max_abs:.1e}, max rel err {r.max_rel:.1e}, worst "
              f"index {r.worst_index}: {'ok' if r.ok else 'WRONG'}", file=file)
    if not all(r.ok for r in rows):
        print(f"{path}: the lines are right but the gradients returned are not: check the return line "
              f"(the order is forward's inputs: {', '.join(case.names[i] for i in case.wrt)}).", file=file)
        return 1
    print("All right.", file=file)
    return 0


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m nanograd.exercise", allow_abbrev=False,
                                     description="Write a backward pass yourself, checked line by line.")
    parser.add_argument("kernel", help=", ".join(KERNELS))
    parser.add_argument("--check", nargs="?", const="", metavar="FILE",
                        help="check FILE (default exercises/KERNEL.py) instead of writing the exercise")
    parser.add_argument("--whole", action="store_true",
                        help="the harder level: blank every line from the first gradient to the return")
    parser.add_argument("--seed", type=int, default=0, help="seeds the inputs of --check")
    args = parser.parse_args(argv)
    try:
        if args.kernel not in KERNELS:
            raise UserError(f"unknown kernel {args.kernel!r}; choose one of {', '.join(KERNELS)}.")
        path = pathlib.Path(args.check or f"exercises/{args.kernel}.py")
        if args.check is not None:
            return check(args.kernel, path, args.seed)
        write_exercise(args.kernel, path, args.whole)
        print(f"wrote {path}: fill in each `...`, then python -m nanograd.exercise {args.kernel} --check")
        return 0
    except UserError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
