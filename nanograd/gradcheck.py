"""Gradient checks: each backward against central finite differences in
float64 and, when torch is installed, against torch autograd.

    python -m nanograd.gradcheck          # one table row per kernel input

The loss whose gradient is checked is sum(out * G) for a random upstream
gradient G, never plain sum(out): a softmax or a LayerNorm output sums to
a constant along its normalised axis, so sum(out) has zero gradient there
and hides exactly the bugs worth finding.
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


class Row(NamedTuple):
    kernel: str
    input: str
    max_abs: float      # max |analytic - numerical|
    max_rel: float      # max |analytic - numerical| / max(|numerical|, ATOL)
    worst_index: tuple  # where |a - n| - (ATOL + RTOL |n|) is largest
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


def check_kernel(kernel, forward, backward, inputs, wrt, names, torch_forward=None, seed=0):
    """One Row per input in wrt (indices into inputs, matching backward's outputs).

    forward(*inputs) -> (out, cache); backward(dout, cache) -> gradients of
    inputs[i] for i in wrt, in that order.  Inputs must be float64 arrays
    (integer ids excepted) and are restored after each perturbation.
    """
    xp = get_array_module(inputs[wrt[0]])
    out, _ = forward(*inputs)
    dout = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))  # like out
    out, grads = analytic_gradients(forward, backward, inputs, dout)
    torch_out, torch_grads = None, None
    if torch_forward is not None and _torch_available():
        torch_out, torch_grads = torch_gradients(torch_forward, inputs, wrt, dout)

    def loss_of():
        return float((forward(*inputs)[0] * dout).sum())

    rows = []
    for j, i in enumerate(wrt):
        a = to_host(grads[j])
        n = numerical_gradient(loss_of, inputs[i])
        err = np.abs(a - n)
        excess = err - (ATOL + RTOL * np.abs(n))
        worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
        torch_abs = float("nan")
        if torch_grads is not None:
            torch_abs = max(np.abs(to_host(out) - torch_out).max(initial=0.0),
                            np.abs(a - torch_grads[j]).max(initial=0.0))
        rows.append(Row(kernel, names[j], float(err.max(initial=0.0)),
                        float((err / np.maximum(np.abs(n), ATOL)).max(initial=0.0)),
                        tuple(int(w) for w in worst), bool((excess <= 0).all()), torch_abs))
    return rows


def _torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def standard_cases(xp, seed=0):
    """A small instance of every kernel: (kernel, forward, backward, inputs, wrt, names, torch_forward)."""
    from . import (attention_forward, attention_backward, cross_entropy_forward,
                   cross_entropy_backward, dropout_forward, dropout_backward,
                   embedding_forward, embedding_backward, layernorm_forward,
                   layernorm_backward, linear_forward, linear_backward,
                   relu_forward, relu_backward)
    from .fast.linear_cross_entropy import linear_cross_entropy_forward, linear_cross_entropy_backward
    rng = np.random.default_rng(seed)
    B, T, C, NH, V = 2, 5, 8, 2, 11
    hs = C // NH

    def randn(*shape):
        return xp.asarray(rng.standard_normal(shape))

    idx = xp.asarray(rng.integers(0, V, size=(B, T)))
    idx[0, :2] = 3  # a repeated id must accumulate
    relu_x = randn(B, T, C)
    relu_x += xp.sign(relu_x) * 0.1  # stay 0.1 away from the kink at 0
    p = 0.3

    def dropout_fwd(x):
        return dropout_forward(x, p, make_rng(xp, seed))  # same mask every call

    def attention_fwd(x, Wq, Wk, Wv):
        return attention_forward(x, Wq, Wk, Wv, p, make_rng(xp, seed))

    def as_torch(keep):  # our dropout mask, as a torch constant
        import torch
        return torch.tensor(to_host(keep))

    def torch_attention(x, Wq, Wk, Wv):
        import torch
        q, k, v = (torch.einsum("btc,nhc->bnth", x, W) for W in (Wq, Wk, Wv))
        preatt = q @ k.transpose(-2, -1) / hs ** 0.5
        preatt = preatt.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
        att = torch.softmax(preatt, dim=-1) * as_torch(attention_fwd(*att_inputs)[1].dropout.keep)
        return (att @ v).transpose(1, 2).reshape(B, T, NH * hs)

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
    return [
        ("embedding", embedding_forward, embedding_backward, [idx, randn(V, C)], [1], ["W"],
         lambda idx, W: W[idx]),
        ("linear", linear_forward, linear_backward, [randn(B, T, C), randn(3 * C, C), randn(3 * C)],
         [0, 1, 2], ["x", "W", "b"], torch_linear),
        ("relu", relu_forward, relu_backward, [relu_x], [0], ["x"], lambda x: x.clamp(min=0)),
        ("dropout", dropout_fwd, dropout_backward, drop_inputs, [0], ["x"],
         lambda x: x * as_torch(dropout_fwd(*drop_inputs)[1].keep)),
        ("layernorm", layernorm_forward, layernorm_backward,
         [randn(B, T, C), 1 + randn(C), randn(C)], [0, 1, 2], ["x", "w", "b"], torch_layernorm),
        ("attention", attention_fwd, attention_backward, att_inputs, [0, 1, 2, 3],
         ["x", "Wq", "Wk", "Wv"], torch_attention),
        ("cross_entropy", cross_entropy_forward, cross_entropy_backward,
         [randn(B * T, V) * 3, xp.asarray(rng.integers(0, V, size=B * T))], [0], ["logits"],
         torch_cross_entropy),
        ("linear_cross_entropy", linear_cross_entropy_fwd, linear_cross_entropy_backward,
         [randn(B, T, C), randn(V, C), randn(V), xp.asarray(rng.integers(0, V, size=B * T))], [0, 1, 2],
         ["x", "W", "b"], torch_linear_cross_entropy),
    ]


def run(xp=np, seed=0, file=None):
    """Check every kernel, print the table (to file, default stdout), return True when all rows pass."""
    file = sys.stdout if file is None else file  # looked up now, so redirect_stdout works
    rows = []
    for kernel, forward, backward, inputs, wrt, names, torch_forward in standard_cases(xp, seed):
        rows += check_kernel(kernel, forward, backward, inputs, wrt, names, torch_forward, seed)
    header = f"{'kernel':<22}{'input':<8}{'max abs err':>13}{'max rel err':>13}  {'worst index':<14}{'vs torch':>11}  result"
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        torch_text = "n/a" if np.isnan(r.torch_abs) else f"{r.torch_abs:.1e}"
        print(f"{r.kernel:<22}{r.input:<8}{r.max_abs:>13.1e}{r.max_rel:>13.1e}  {str(r.worst_index):<14}"
              f"{torch_text:>11}  {'ok' if r.ok else 'FAIL'}", file=file)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} gradients agree with finite differences "
          f"(float64, h={H:g}, pass when |a-n| <= {ATOL:g} + {RTOL:g}|n|)", file=file)
    return not failed


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m nanograd.gradcheck", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                        help="numpy (the CPU) or cupy (an NVIDIA GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)
    from .backend import BackendError, get_backend
    try:
        xp = get_backend(args.backend)
    except BackendError as e:
        print(e, file=sys.stderr)
        return 2
    return 0 if run(xp, args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
