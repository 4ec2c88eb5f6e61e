"""Follow a backward pass line by line, each gradient checked against torch's.

    python -m nanograd.trace layernorm     # or linear, relu, dropout, attention,
                                           # cross_entropy, embedding, block

It builds small float64 inputs (seeded), runs the plain forward, then runs
the plain backward one statement at a time (sys.settrace) and prints each
executed line with every variable the line assigned or changed in place,
its shape and, for a gradient d<name>, its distance from torch autograd's
gradient of the forward's <name>: torch recomputes the forward with every
intermediate retained (dpreatt against preatt.grad).  A gradient that a
later line adds to (dx1 before `dx1 += dout`) is marked partial.  Without
torch there is no oracle for the intermediates: it prints the shapes and
checks the final gradients against finite differences.

In Python (a notebook): rows = trace("layernorm"), a Row per executed line.
"""
import ast
import inspect
import pathlib
import sys
from typing import NamedTuple

import numpy as np

from .block import BlockParams, block_backward, block_forward
from .backend import make_rng
from .errors import UserError
from .gradcheck import check_kernel, standard_cases
from .layernorm import EPS

KERNELS = ("linear", "relu", "dropout", "layernorm", "attention", "cross_entropy", "embedding", "block")

# Ours and torch's in float64, the same formulas in another order: they differ by
# rounding, ~1e-16 of the largest entry times a few dozen operations.
TOLERANCE = 1e-10


# --- Running a function one statement at a time ----------------------------------------

class Step(NamedTuple):
    line: int       # the statement's first line in its file
    changed: dict   # name -> value (arrays copied) of each local it bound or changed in place


class Raised(Exception):
    """The traced function raised; steps holds the statements that finished before."""

    def __init__(self, error, line, steps):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.line, self.steps = error, line, steps


def function_tree(function):
    """(the lines of function's file, function's ast.FunctionDef, line numbers as in the file)."""
    code = function.__code__
    lines = pathlib.Path(code.co_filename).read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef) and node.name == code.co_name and node.lineno == code.co_firstlineno:
            return lines, node
    raise UserError(f"cannot find the source of {code.co_name} in {code.co_filename}; write it as a def there.")


def statement_source(function, line):
    """The source of function's statement that starts on line (its first line only, for an if)."""
    lines, definition = function_tree(function)
    for statement in ast.walk(definition):
        if isinstance(statement, ast.stmt) and statement.lineno == line:
            last = statement.lineno if hasattr(statement, "body") else statement.end_lineno
            return "\n".join(lines[line - 1:last])
    raise ValueError(f"no statement of {function.__name__} starts on line {line}")


def statement_lines(function):
    """{line: first line of the innermost statement of function's body that holds it}."""
    _, definition = function_tree(function)
    first_line = {}
    for statement in ast.walk(definition):  # outer statements first, so inner ones overwrite them
        if isinstance(statement, ast.stmt) and statement is not definition:
            for line in range(statement.lineno, statement.end_lineno + 1):
                first_line[line] = statement.lineno
    return first_line


def snapshot(local_variables):
    """name -> (the object, a copy of it when it is an array, so later in-place changes show)."""
    return {name: (value, value.copy() if isinstance(value, np.ndarray) else None)
            for name, value in local_variables.items()}


def changes(before, after):
    """name -> value of each local that after binds anew or whose array contents changed."""
    changed = {}
    for name, (value, copy) in after.items():
        old_value, old_copy = before.get(name, (None, None))
        if name not in before or old_value is not value or (
                copy is not None and not np.array_equal(old_copy, copy, equal_nan=True)):  # changed in place
            changed[name] = copy if copy is not None else value
    return changed


def run_line_by_line(function, *args):
    """Call function(*args), noting after each of its statements which locals it changed.

    Returns (steps, the return value).  sys.settrace reports a 'line' event
    before each line runs, so a statement has finished when the next one
    starts or the function returns.  Only function's own frame is followed;
    the functions it calls run untraced.  If it raises: Raised, with the
    line that raised and the steps before it.
    """
    first_line = statement_lines(function)
    steps = []
    now = {"line": None, "locals": None, "error": None}

    def follow(frame, event, arg):
        if event == "exception":
            now["error"] = now["line"]
        elif event in ("line", "return"):
            line = first_line.get(frame.f_lineno) if event == "line" else None
            if line != now["line"]:
                after = snapshot(frame.f_locals)
                if now["line"] is not None and now["error"] is None:
                    steps.append(Step(now["line"], changes(now["locals"], after)))
                now["line"], now["locals"] = line, after
            if event == "line":
                now["error"] = None  # the function caught it
        return follow

    def start(frame, event, arg):
        if frame.f_code is not function.__code__:
            return None  # a function it calls
        now["locals"] = snapshot(frame.f_locals)  # the arguments
        return follow

    previous = sys.gettrace()  # a debugger's or coverage's, put back after
    sys.settrace(start)
    try:
        result = function(*args)
    except Exception as error:
        raise Raised(error, now["error"], steps) from error
    finally:
        sys.settrace(previous)
    return steps, result


def flatten(gradients):
    """A backward's return value as a flat list of arrays: (dx, BlockParams(...)) -> [dx, dln1_w, ...]."""
    if isinstance(gradients, tuple):
        return [g for item in gradients for g in flatten(item)]
    return [gradients]


# --- The kernels' small cases and their torch oracles ----------------------------------

class Case(NamedTuple):
    kernel: str
    forward: object        # forward(*inputs) -> (out, cache); the same dropout masks every call
    backward: object       # the plain backward: backward(dout, cache) -> gradients
    inputs: list           # forward's inputs: float64 arrays, and integer ids
    names: list            # their names
    wrt: list              # indices of the inputs the backward returns gradients of, in its order
    torch_forward: object  # torch_forward(cache, *tensors) -> (out, locals()): the oracle


def keep_mask(dropout_cache):
    """Our forward's dropout mask as a torch constant (1 when there was none), so torch drops the same."""
    import torch
    return torch.tensor(1.0 if dropout_cache.keep is None else dropout_cache.keep)


# Each oracle is the forward again in torch, with the names of the NumPy forward
# and backward: it returns locals(), and every tensor in it gets its .grad kept.

def torch_linear(cache, x, W, b):
    x_rows = x.reshape(-1, x.shape[-1])  # (N, IN)
    out_rows = x_rows @ W.T + b  # (N, OUT)
    out = out_rows.reshape(*x.shape[:-1], W.shape[0])  # (..., OUT)
    return out, locals()


def torch_relu(cache, x):
    out = x.clamp(min=0)  # (...)
    return out, locals()


def torch_dropout(cache, x):
    out = x * keep_mask(cache)  # (...)
    return out, locals()


def torch_layernorm(cache, x, w, b):
    mean = x.mean(-1, keepdim=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(-1, keepdim=True)  # (..., 1)
    rstd = 1.0 / (var + EPS) ** 0.5  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * w + b  # (..., C)
    return out, locals()


def torch_attention(cache, x, Wq, Wk, Wv):
    import torch
    B, T, C = x.shape
    NH, hs, _ = Wq.shape
    x_rows = x.reshape(B * T, C)  # (B*T, C)
    q_rows, k_rows, v_rows = (x_rows @ W.reshape(NH * hs, C).T for W in (Wq, Wk, Wv))  # (B*T, NH*hs) each
    q, k, v = (rows.reshape(B, T, NH, hs).transpose(1, 2) for rows in (q_rows, k_rows, v_rows))  # (B, NH, T, hs)
    preatt = q @ k.transpose(-2, -1) / hs ** 0.5  # (B, NH, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T)
    att = torch.softmax(preatt.masked_fill(future, float("-inf")), dim=-1)  # (B, NH, T, T)
    att_drop = att * keep_mask(cache.dropout)  # (B, NH, T, T)
    y = att_drop @ v  # (B, NH, T, hs)
    out = y.transpose(1, 2).reshape(B, T, NH * hs)  # (B, T, NH*hs)
    return out, locals()


def torch_cross_entropy(cache, logits, targets):
    import torch
    out = torch.nn.functional.cross_entropy(logits, targets)  # ()
    return out, locals()


def torch_embedding(cache, idx, W):
    out = W[idx]  # (B, T, C)
    return out, locals()


def torch_block(cache, x, ln1_w, ln1_b, Wq, Wk, Wv, proj_W, proj_b, ln2_w, ln2_b, fc1_W, fc1_b, fc2_W, fc2_b):
    ln1_out = torch_layernorm(None, x, ln1_w, ln1_b)[0]  # (B, T, C)
    attn_out = torch_attention(cache.attn, ln1_out, Wq, Wk, Wv)[0]  # (B, T, C)
    proj_out = torch_linear(None, attn_out, proj_W, proj_b)[0]  # (B, T, C)
    drop1_out = proj_out * keep_mask(cache.drop1)  # (B, T, C)
    x1 = x + drop1_out  # (B, T, C)
    ln2_out = torch_layernorm(None, x1, ln2_w, ln2_b)[0]  # (B, T, C)
    fc1_out = torch_linear(None, ln2_out, fc1_W, fc1_b)[0]  # (B, T, 4C)
    relu_out = fc1_out.clamp(min=0)  # (B, T, 4C)
    fc2_out = torch_linear(None, relu_out, fc2_W, fc2_b)[0]  # (B, T, C)
    drop2_out = fc2_out * keep_mask(cache.drop2)  # (B, T, C)
    out = x1 + drop2_out  # (B, T, C)
    return out, locals()


ORACLES = dict(linear=torch_linear, relu=torch_relu, dropout=torch_dropout, layernorm=torch_layernorm,
               attention=torch_attention, cross_entropy=torch_cross_entropy, embedding=torch_embedding,
               block=torch_block)


def block_case(seed):
    """One block, B, T, C, NH = 2, 5, 8, 2, dropout 0.1 in training mode."""
    rng = np.random.default_rng(seed)
    B, T, C, NH, p = 2, 5, 8, 2, 0.1
    shapes = dict(ln1_w=(C,), ln1_b=(C,), Wq=(NH, C // NH, C), Wk=(NH, C // NH, C), Wv=(NH, C // NH, C),
                  proj_W=(C, C), proj_b=(C,), ln2_w=(C,), ln2_b=(C,), fc1_W=(4 * C, C), fc1_b=(4 * C,),
                  fc2_W=(C, 4 * C), fc2_b=(C,))
    params = {name: rng.standard_normal(shape) / shape[-1] ** 0.5 for name, shape in shapes.items()}  # like an init
    params["ln1_w"] += 1  # LayerNorm weights near 1
    params["ln2_w"] += 1

    def forward(x, *params):
        return block_forward(x, BlockParams(*params), p, make_rng(np, seed), True)  # same masks every call

    inputs = [rng.standard_normal((B, T, C)), *params.values()]
    return Case("block", forward, block_backward, inputs, ["x", *params], list(range(len(inputs))), torch_block)


def make_case(kernel, seed=0):
    """The small float64 instance of kernel that trace and exercise use (gradcheck's, and a block)."""
    if kernel not in KERNELS:
        raise UserError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}.")
    if kernel == "block":
        return block_case(seed)
    for name, forward, backward, inputs, wrt, _, _ in standard_cases(np, seed):
        if name == kernel:
            oracle = ORACLES[kernel]
            names = list(inspect.signature(oracle).parameters)[1:]  # after cache
            return Case(kernel, forward, backward, inputs, names, wrt, oracle)


def upstream_gradient(out, seed):
    """A random dout shaped like out (never ones: see gradcheck)."""
    return np.random.default_rng(seed).standard_normal(np.shape(out))  # like out


def torch_gradients(case, cache, dout):
    """{name: torch's gradient} for every input and intermediate tensor of the oracle; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    tensors = [torch.tensor(a, requires_grad=np.issubdtype(a.dtype, np.floating)) for a in case.inputs]
    out, named = case.torch_forward(cache, *tensors)
    named = {name: t for name, t in named.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    for t in named.values():
        if not t.is_leaf:
            t.retain_grad()
    out.backward(torch.tensor(dout))
    return {name: t.grad.numpy() for name, t in named.items() if t.grad is not None}


# --- Rows -------------------------------------------------------------------------------

class Value(NamedTuple):
    name: str
    value: object        # an array, or what the line assigned (an int, a tuple ...)
    oracle: str          # the tensor whose .grad it is compared with ('' when not a gradient)
    max_abs: float       # max |ours - torch's|; nan when not compared
    max_rel: float       # max_abs / max |torch's|
    completed_on: int    # the line that completes a partial gradient; None when it is final


class Row(NamedTuple):
    line: int
    source: str          # the statement (its first line for an if)
    values: list         # Value for each local the line changed; for a return, the gradients returned


def compare(name, value, oracle):
    """A Value for name, compared with oracle[name without its d] when it is a gradient torch has."""
    base = name[1:] if name.startswith("d") else None
    if oracle is None or base not in oracle or not isinstance(value, np.ndarray):
        return Value(name, value, "", float("nan"), float("nan"), None)
    expected = oracle[base]
    if expected.shape != value.shape:
        return Value(name, value, base, float("inf"), float("inf"), None)
    max_abs = float(np.abs(value - expected).max(initial=0.0))
    return Value(name, value, base, max_abs, max_abs / max(float(np.abs(expected).max(initial=0.0)), 1e-300), None)


def trace_case(case, seed=0):
    """(rows, oracle gradients or None) for case's backward, run line by line."""
    out, cache = case.forward(*case.inputs)
    dout = upstream_gradient(out, seed)
    oracle = torch_gradients(case, cache, dout)
    steps, returned = run_line_by_line(case.backward, dout, cache)
    rows = []
    for i, step in enumerate(steps):
        source = statement_source(case.backward, step.line)
        values = []
        for name, value in step.changed.items():
            later = [s.line for s in steps[i + 1:] if name in s.changed]
            values.append(compare(name, value, oracle)._replace(completed_on=later[-1] if later else None))
        if source.lstrip().startswith("return"):
            values = [compare("d" + case.names[j], g, oracle) for j, g in zip(case.wrt, flatten(returned))]
        rows.append(Row(step.line, source, values))
    return rows, oracle


def trace(kernel, seed=0):
    """The rows of kernel's backward, traced: a Row per executed statement (for a notebook)."""
    return trace_case(make_case(kernel, seed), seed)[0]


# --- Printing -----------------------------------------------------------------------------

def describe(value):
    """An array's shape, or a short form of anything else."""
    if isinstance(value, np.ndarray):
        return str(value.shape)
    if isinstance(value, (int, float, bool, str)):
        return repr(value)
    if inspect.ismodule(value):
        return value.__name__
    return type(value).__name__


def print_trace(kernel, seed=0, file=None):
    """Print kernel's traced backward; returns True when every final gradient agrees with the oracle."""
    file = sys.stdout if file is None else file
    case = make_case(kernel, seed)
    rows, oracle = trace_case(case, seed)
    backward = case.backward
    path = pathlib.Path(backward.__code__.co_filename)
    sizes = ", ".join(f"{n} {a.shape}" for n, a in zip(case.names, case.inputs))
    print(f"{backward.__name__}{inspect.signature(backward)} in nanograd/{path.name}, line by line", file=file)
    print(f"inputs (float64, seed {seed}): {sizes}; dout random, like the output", file=file)
    if oracle is None:
        print("torch is not installed, so no oracle for the gradients on each line: shapes only, then the "
              "final gradients against finite differences", file=file)
    else:
        print("each gradient d<name> against torch's <name>.grad: max abs error, and rel = abs / max |torch's|",
              file=file)
    ok, shown = True, {}
    for row in rows:
        print(file=file)
        lines = row.source.split("\n")
        indent = len(lines[0]) - len(lines[0].lstrip())
        for i, text in enumerate(lines):
            print(f"{row.line + i:5}  {text[indent:]}", file=file)
        for v in row.values:
            if v.completed_on is None and isinstance(v.value, np.ndarray):
                if v.name in shown and np.array_equal(shown[v.name], v.value):
                    continue  # a returned gradient printed already, on the line that made it
                shown[v.name] = v.value
            notes = []
            if v.oracle:
                notes.append(f"abs {v.max_abs:.1e}  rel {v.max_rel:.1e}  vs {v.oracle}.grad")
                ok = ok and (v.completed_on is not None or v.max_rel <= TOLERANCE)
            if v.completed_on is not None:
                notes.append(f"partial: line {v.completed_on} completes it")
            note = ", ".join(notes)
            print(f"{'':7}{v.name + ' ':<11}{describe(v.value):<16}{note}".rstrip(), file=file)
    print(file=file)
    if oracle is None:
        def backward(dout, cache):  # the gradients as one flat tuple, as check_kernel takes them
            return tuple(flatten(case.backward(dout, cache)))

        checks = check_kernel(kernel, case.forward, backward, case.inputs, case.wrt,
                              [case.names[i] for i in case.wrt], seed=seed)
        for r in checks:
            print(f"d{r.input}: finite differences max abs err {r.max_abs:.1e}, max rel err {r.max_rel:.1e}: "
                  f"{'ok' if r.ok else 'FAIL'}", file=file)
        return all(r.ok for r in checks)
    print(f"every final gradient within {TOLERANCE:g} (rel) of torch's: {'yes' if ok else 'NO'}", file=file)
    return ok



def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m nanograd.trace", allow_abbrev=False,
                                     description="Run a plain backward line by line against torch's gradients.")
    parser.add_argument("kernel", help=", ".join(KERNELS))
    parser.add_argument("--seed", type=int, default=0, help="seeds the inputs, dout and dropout masks")
    args = parser.parse_args(argv)
    try:
        return 0 if print_trace(args.kernel, args.seed) else 1
    except UserError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
