"""Gradient checks: each backward against central finite differences in float64 and, when torch is
installed, against torch autograd.

    python -m nanograd.gradcheck                     # every kernel and the block, one row per input
    python -m nanograd.gradcheck --kernel attention  # one of them
    python -m transformer.gradcheck                  # the same table plus a whole-model row

The loss whose gradient is checked is sum(out * G) for a random upstream
gradient G, never plain sum(out): a softmax or a LayerNorm output sums to
a constant along its normalised axis, so sum(out) has zero gradient there
and hides exactly the bugs worth finding.

How to read a row (a = the backward's gradient, n = the finite difference):
  max abs err   max |a - n| over the input's entries.
  max rel err   max |a - n| / |n| over the entries where |n| > REL_FLOOR = ATOL/RTOL
                only, where the tolerance is relative ("-" when there are none).  Below,
                the tolerance is ATOL: the difference there is finite-difference noise,
                and noise divided by a small gradient says nothing.
  worst index   the entry that comes nearest to failing: the largest
                err/tol = |a - n| / (ATOL + RTOL |n|), the pass rule's own measure;
  analytic, numerical   a and n there;  err/tol  its value (a row passes when <= 1).
  vs torch      max |ours - torch| over the output and this gradient (n/a: no torch twin here).
The whole model lives in transformer, which nanograd never imports: its row is
python -m transformer.gradcheck, this table plus that row.
"""
import sys
from typing import NamedTuple

import numpy as np

from .backend import get_array_module, make_rng, to_host

# Central differences with h = 1e-6 in float64: truncation error ~h^2 and
# rounding error ~1e-16 * |loss| / h ~ 1e-10 * |loss|, so a correct
# gradient agrees to about 1e-8; a wrong one is off by O(1).
H = 1e-6
RTOL, ATOL = 1e-5, 1e-7
# A relative error means something only where the pass rule's tolerance is relative, RTOL |n| >= ATOL:
# below that the tolerance is ATOL, and |a - n| of finite-difference noise (~1e-10) over a gradient
# near 1e-7 reads as a relative error of 1e-3 in a row that is fine.
REL_FLOOR = ATOL / RTOL  # 1e-2

# The sizes of every standard case: small, so that every entry is perturbed.
SIZES = dict(B=2, T=5, C=8, NH=2, V=11)
DROPOUT_P = 0.3  # dropout, attention and the block draw their masks from one fixed seed: the same every call

# Rows of the fast path (nanograd/fast/): train.py's default, tested against the plain pair it replaces.
FAST_PATH = {"linear_cross_entropy": "nanograd/fast/linear_cross_entropy.py (the output layer and loss fused, "
                                     "train.py's default)"}


class Case(NamedTuple):
    kernel: str
    forward: object        # forward(*inputs) -> (out, cache)
    backward: object       # backward(dout, cache) -> gradients of inputs[i] for i in wrt
    inputs: list
    wrt: list              # indices into inputs
    names: list            # one per wrt
    torch_forward: object  # torch_forward(*tensors) -> out, or None


class Row(NamedTuple):
    kernel: str
    input: str
    max_abs: float      # max |a - n|
    max_rel: float      # max |a - n| / |n| over the entries with |n| > REL_FLOOR; nan when there are none
    worst_index: tuple  # argmax of err/tol = |a - n| / (ATOL + RTOL |n|)
    analytic: float     # a at worst_index
    numerical: float    # n at worst_index
    err_over_tol: float  # err/tol at worst_index: the row passes when it is <= 1
    ok: bool
    torch_abs: float    # max |ours - torch| over out and this gradient; nan without torch


def numerical_gradient(loss_of, x, h=H):
    """d loss_of() / dx by central differences, perturbing x in place."""
    grad = np.zeros(x.shape)
    for i in np.ndindex(*x.shape):
        old = x[i].item()
        x[i] = old + h
        up = loss_of()
        x[i] = old - h
        down = loss_of()
        x[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


def analytic_gradients(forward, backward, inputs, dout):
    """Run forward then backward; the gradients as a tuple."""
    out, cache = forward(*inputs)
    grads = backward(dout, cache)
    return out, grads if isinstance(grads, tuple) else (grads,)


def torch_gradients(torch_forward, inputs, wrt, dout):
    """Output and gradients of inputs[wrt] from torch autograd on the CPU, float64."""
    import torch
    tensors = [torch.tensor(to_host(a)) for a in inputs]
    for i in wrt:
        tensors[i].requires_grad_(True)
    out = torch_forward(*tensors)
    out.backward(torch.tensor(to_host(dout)))
    return out.detach().numpy(), [tensors[i].grad.numpy() for i in wrt]


def compare(kernel, name, a, n, torch_abs=float("nan")):
    """The Row of an analytic gradient a against its numerical twin n (host arrays of one shape)."""
    err = np.abs(a - n)
    err_over_tol = err / (ATOL + RTOL * np.abs(n))
    worst = np.unravel_index(np.argmax(err_over_tol), n.shape) if n.size else ()
    above = np.abs(n) > REL_FLOOR
    max_rel = float((err[above] / np.abs(n[above])).max()) if above.any() else float("nan")
    worst_ratio = float(err_over_tol[worst]) if n.size else 0.0
    return Row(kernel, name, float(err.max(initial=0.0)), max_rel, tuple(int(w) for w in worst),
               float(a[worst]) if n.size else 0.0, float(n[worst]) if n.size else 0.0,
               worst_ratio, worst_ratio <= 1.0, torch_abs)


def check_kernel(kernel, forward, backward, inputs, wrt, names, torch_forward=None, seed=0):
    """One Row per input in wrt (indices into inputs, matching backward's outputs).

    forward(*inputs) -> (out, cache); backward(dout, cache) -> gradients of
    inputs[i] for i in wrt, in that order.  Inputs must be float64 arrays
    (integer ids excepted) and are restored after each perturbation.
    """
    xp = get_array_module(inputs[wrt[0]])
    out, _ = forward(*inputs)
    dout = xp.asarray(np.random.default_rng(seed).standard_normal(np.shape(out)))  # like out
    out, grads = analytic_gradients(forward, backward, inputs, dout)
    torch_out, torch_grads = None, None
    if torch_forward is not None and _torch_available():
        torch_out, torch_grads = torch_gradients(torch_forward, inputs, wrt, dout)

    def loss_of():
        return float((forward(*inputs)[0] * dout).sum())

    rows = []
    for j, i in enumerate(wrt):
        a = to_host(grads[j])
        torch_abs = float("nan")
        if torch_grads is not None:
            torch_abs = max(np.abs(to_host(out) - torch_out).max(initial=0.0),
                            np.abs(a - torch_grads[j]).max(initial=0.0))
        rows.append(compare(kernel, names[j], a, numerical_gradient(loss_of, inputs[i]), torch_abs))
    return rows


def _torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def standard_cases(xp, seed=0):
    """A small instance of every kernel, then of nanograd/block.py's block: a Case each."""
    from . import (attention_forward, attention_backward, cross_entropy_forward,
                   cross_entropy_backward, dropout_forward, dropout_backward,
                   embedding_forward, embedding_backward, layernorm_forward,
                   layernorm_backward, linear_forward, linear_backward,
                   relu_forward, relu_backward)
    from .block import BlockParams, block_backward, block_forward
    from .fast.linear_cross_entropy import linear_cross_entropy_forward, linear_cross_entropy_backward
    rng = np.random.default_rng(seed)
    B, T, C, NH, V = SIZES.values()
    hs = C // NH
    p = DROPOUT_P

    def randn(*shape):
        return xp.asarray(rng.standard_normal(shape))

    idx = xp.asarray(rng.integers(0, V, size=(B, T)))
    idx[0, :2] = 3  # a repeated id must accumulate
    relu_x = randn(B, T, C)
    relu_x += xp.sign(relu_x) * 0.1  # stay 0.1 away from the kink at 0

    def dropout_fwd(x):
        return dropout_forward(x, p, make_rng(xp, seed))  # same mask every call

    def attention_fwd(x, Wq, Wk, Wv):
        return attention_forward(x, Wq, Wk, Wv, p, make_rng(xp, seed))

    def block_fwd(x, *params):
        return block_forward(x, BlockParams(*params), p, make_rng(xp, seed))

    def block_bwd(dout, cache):
        dx, dparams = block_backward(dout, cache)
        return (dx, *dparams)

    def as_torch(keep):  # our dropout mask, as a torch constant
        import torch
        return torch.tensor(to_host(keep))

    def torch_heads(x, Wq, Wk, Wv, keep):
        import torch
        q, k, v = (torch.einsum("btc,nhc->bnth", x, W) for W in (Wq, Wk, Wv))
        preatt = q @ k.transpose(-2, -1) / hs ** 0.5
        preatt = preatt.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
        att = torch.softmax(preatt, dim=-1) * as_torch(keep)
        return (att @ v).transpose(1, 2).reshape(B, T, NH * hs)

    def torch_attention(x, Wq, Wk, Wv):
        return torch_heads(x, Wq, Wk, Wv, attention_fwd(*att_inputs)[1].dropout.keep)

    def torch_block(x, *params):  # our three dropout masks as constants
        import torch
        F, P, masks = torch.nn.functional, BlockParams(*params), block_fwd(*block_inputs)[1]
        attn = torch_heads(F.layer_norm(x, (C,), P.ln1_w, P.ln1_b, eps=1e-5), P.Wq, P.Wk, P.Wv, masks.attn.dropout.keep)
        x1 = x + F.linear(attn, P.proj_W, P.proj_b) * as_torch(masks.drop1.keep)
        hidden = F.relu(F.linear(F.layer_norm(x1, (C,), P.ln2_w, P.ln2_b, eps=1e-5), P.fc1_W, P.fc1_b))
        return x1 + F.linear(hidden, P.fc2_W, P.fc2_b) * as_torch(masks.drop2.keep)

    def torch_cross_entropy(logits, targets):
        import torch
        return torch.nn.functional.cross_entropy(logits, targets)

    def linear_cross_entropy_fwd(x, W, b, targets):  # 4 chunks (3, 3, 3, 2) of the 11 columns
        return linear_cross_entropy_forward(x, W, b, targets, xp.empty((B * T, V)), vchunk=3)

    def torch_linear_cross_entropy(x, W, b, targets):
        import torch
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, W, b).reshape(B * T, V), targets)

    def torch_layernorm(x, w, b):
        import torch
        return torch.nn.functional.layer_norm(x, (C,), w, b, eps=1e-5)

    def torch_linear(x, W, b):
        import torch
        return torch.nn.functional.linear(x, W, b)

    att_inputs = [randn(B, T, C), randn(NH, hs, C), randn(NH, hs, C), randn(NH, hs, C)]
    drop_inputs = [randn(B, T, C)]
    kernel_cases = [
        Case("embedding", embedding_forward, embedding_backward, [idx, randn(V, C)], [1], ["W"],
             lambda idx, W: W[idx]),
        Case("linear", linear_forward, linear_backward, [randn(B, T, C), randn(3 * C, C), randn(3 * C)],
             [0, 1, 2], ["x", "W", "b"], torch_linear),
        Case("relu", relu_forward, relu_backward, [relu_x], [0], ["x"], lambda x: x.clamp(min=0)),
        Case("dropout", dropout_fwd, dropout_backward, drop_inputs, [0], ["x"],
             lambda x: x * as_torch(dropout_fwd(*drop_inputs)[1].keep)),
        Case("layernorm", layernorm_forward, layernorm_backward,
             [randn(B, T, C), 1 + randn(C), randn(C)], [0, 1, 2], ["x", "w", "b"], torch_layernorm),
        Case("attention", attention_fwd, attention_backward, att_inputs, [0, 1, 2, 3],
             ["x", "Wq", "Wk", "Wv"], torch_attention),
        Case("cross_entropy", cross_entropy_forward, cross_entropy_backward,
             [randn(B * T, V) * 3, xp.asarray(rng.integers(0, V, size=B * T))], [0], ["logits"],
             torch_cross_entropy),
        Case("linear_cross_entropy", linear_cross_entropy_fwd, linear_cross_entropy_backward,
             [randn(B, T, C), randn(V, C), randn(V), xp.asarray(rng.integers(0, V, size=B * T))], [0, 1, 2],
             ["x", "W", "b"], torch_linear_cross_entropy),
    ]
    # drawn after the kernels' inputs, which stay what they were before the block joined the table
    block_shapes = BlockParams(ln1_w=(C,), ln1_b=(C,), Wq=(NH, hs, C), Wk=(NH, hs, C), Wv=(NH, hs, C),
                               proj_W=(C, C), proj_b=(C,), ln2_w=(C,), ln2_b=(C,),
                               fc1_W=(4 * C, C), fc1_b=(4 * C,), fc2_W=(C, 4 * C), fc2_b=(C,))
    block_inputs = [randn(B, T, C), *(randn(*shape) * 0.5 + (1.0 if name.endswith("_w") else 0.0)  # LN w near 1
                                      for name, shape in zip(BlockParams._fields, block_shapes))]
    return kernel_cases + [Case("block", block_fwd, block_bwd, block_inputs, list(range(14)),
                                ["x", *BlockParams._fields], torch_block)]


def check_cases(cases, seed=0):
    """Every Row of every case, in order."""
    return [row for case in cases for row in check_kernel(*case, seed=seed)]


def print_table(rows, file=None, notes=()):
    """The table, a legend, and the count line; notes: extra lines printed before the count."""
    file = sys.stdout if file is None else file  # looked up now, so redirect_stdout works
    sizes = " ".join(f"{k}={v}" for k, v in SIZES.items())
    print(f"sizes: {sizes} hs={SIZES['C'] // SIZES['NH']}, dropout p={DROPOUT_P} (fixed masks); "
          f"loss sum(out * G), G random; float64, h={H:g}", file=file)
    header = (f"{'kernel':<22}{'input':<7}{'max abs err':>12}{'max rel err':>12}  {'worst index':<12}"
              f"{'analytic':>16}{'numerical':>16}{'err/tol':>8}{'vs torch':>9}  result")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        kernel = r.kernel + ("*" if r.kernel in FAST_PATH else "")
        rel = "-" if np.isnan(r.max_rel) else f"{r.max_rel:.1e}"
        torch_text = "n/a" if np.isnan(r.torch_abs) else f"{r.torch_abs:.1e}"
        print(f"{kernel:<22}{r.input:<7}{r.max_abs:>12.1e}{rel:>12}  {str(r.worst_index):<12}"
              f"{r.analytic:>16.8e}{r.numerical:>16.8e}{r.err_over_tol:>8.3f}{torch_text:>9}  "
              f"{'ok' if r.ok else 'FAIL'}", file=file)
    print("", file=file)
    for kernel, what in FAST_PATH.items():
        if any(r.kernel == kernel for r in rows):
            print(f"{kernel}*: fast path, {what}", file=file)
    for note in notes:
        print(note, file=file)
    print(f"max rel err: over |n| > {REL_FLOOR:g} = ATOL/RTOL only, where the tolerance is relative "
          f"('-': none);\nworst index: largest err/tol = |a-n| / ({ATOL:g} + {RTOL:g}|n|); vs torch n/a: no torch twin",
          file=file)
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} gradients agree with finite differences "
          f"(pass when |a-n| <= {ATOL:g} + {RTOL:g}|n|, that is err/tol <= 1)", file=file)
    return not failed


def run(xp=np, seed=0, file=None, kernel=None, more=()):
    """Check every case (or the one named kernel), print the table, return True when all rows pass.

    more: (name, make) pairs of further rows, make(xp, seed) -> (Case, note) with note(rows) -> a
    line printed under the table (transformer.gradcheck adds the whole model this way).
    """
    cases = [c for c in standard_cases(xp, seed) if kernel in (None, c.kernel)]
    rows, notes = check_cases(cases, seed), []
    for name, make in more:
        if kernel in (None, name):
            case, note = make(xp, seed)
            case_rows = check_kernel(*case, seed=seed)
            rows += case_rows
            notes.append(note(case_rows))
    return print_table(rows, file, notes)


def seed_type(text):
    """--seed: an integer from 0 to 2**63 - 1 (what NumPy's generators take)."""
    import argparse
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text!r}")
    return seed


def parse_args(argv, prog, kernels):
    """The flags of python -m nanograd.gradcheck (and of transformer.gradcheck, whose kernels add 'model')."""
    from .errors import OneLineParser
    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_argument("--kernel", choices=kernels, metavar="NAME",
                        help="check only this one: " + ", ".join(kernels) + " (default: all)")
    return parser.parse_args(argv)


def backend_or_none(name):
    """The array module, or None after printing why not in one line (the caller exits 2)."""
    from .backend import BackendError, get_backend
    try:
        return get_backend(name)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv=None, prog="python -m nanograd.gradcheck", more=()):
    """The command line; more: further rows, as for run() (python -m transformer.gradcheck passes the model's)."""
    kernels = [c.kernel for c in standard_cases(np)] + [name for name, _ in more]
    args = parse_args(argv, prog, kernels)
    xp = backend_or_none(args.backend)
    if xp is None:
        return 2
    ok = run(xp, args.seed, kernel=args.kernel, more=more)
    if not more:
        print("The whole model, by finite differences on random entries of its parameters: "
              "python -m transformer.gradcheck")
    return 0 if ok else 1


if __name__ == "__main__":
    from .command import run_command
    run_command(main)
