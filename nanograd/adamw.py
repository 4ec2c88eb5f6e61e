"""AdamW, written out, with torch.optim.AdamW's semantics and defaults.  Derivation: docs/adamw.md."""
from .backend import get_array_module
from .clip import grad_norm


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """One AdamW step of one parameter, in place:

        p *= 1 - lr * weight_decay                  decoupled decay
        m  = beta1 * m + (1 - beta1) * g            first moment (momentum)
        v  = beta2 * v + (1 - beta2) * g * g        second moment
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    in torch's order of operations, so float64 results agree to rounding.
    """
    xp = get_array_module(p)
    p *= 1 - lr * weight_decay
    m += (1 - beta1) * (g - m)  # = beta1 * m + (1 - beta1) * g, as torch's lerp
    v *= beta2
    v += (1 - beta2) * g * g
    denom = xp.sqrt(v) / (1 - beta2 ** t) ** 0.5 + eps
    p -= lr / (1 - beta1 ** t) * (m / denom)


class AdamW:
    """opt = AdamW(params, lr=1e-3); opt.step(grads).

    params and grads are dicts name -> array; every parameter is updated in
    place by adamw_update.  Defaults are torch's: betas (0.9, 0.999), eps
    1e-8, weight_decay 0.01 applied to every parameter.  State (m, v per
    parameter name, and the step count t from 1) round-trips through state_dict().

    no_decay: names of parameters updated with weight_decay 0, as torch does
    for a second param group {"params": [...], "weight_decay": 0.0}; nanoGPT
    puts there every parameter of fewer than 2 dimensions (biases, LayerNorm).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, no_decay=()):
        for name, p in params.items():
            if not p.flags.c_contiguous:
                raise ValueError(f"parameter {name} must be C-contiguous to be updated in place")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.no_decay = frozenset(no_decay)
        self.t = 0
        self.m = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}

    def step(self, grads):
        """One update of every parameter from grads (same names).  Returns the
        gradients' global norm, sqrt(sum of every element squared), for the
        caller to stop a run that blew up (train.py does)."""
        norm = grad_norm(grads)
        self.t += 1
        for name, p in self.params.items():
            adamw_update(p, grads[name], self.m[name], self.v[name],
                         self.lr, *self.betas, self.eps, self.decay(name), self.t)
        return norm

    def decay(self, name):
        """The weight decay of the parameter called name: 0 if it is in no_decay."""
        return 0.0 if name in self.no_decay else self.weight_decay

    def state_dict(self):
        """Everything needed to resume: hyperparameters, t, and m, v by name.

        A snapshot: m and v are copies, like t, so later steps don't change it.
        """
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "t": self.t,
                "m": {name: m.copy() for name, m in self.m.items()},
                "v": {name: v.copy() for name, v in self.v.items()}}

    def load_state_dict(self, state):
        """Restore from state_dict(); m and v (host or device arrays) are copied into place."""
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        self.betas = tuple(state["betas"])
        self.t = int(state["t"])
        for name, p in self.params.items():
            xp = get_array_module(p)
            self.m[name][...] = xp.asarray(state["m"][name])
            self.v[name][...] = xp.asarray(state["v"][name])
