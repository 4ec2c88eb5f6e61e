"""AdamW, written out, with exactly torch.optim.AdamW's semantics and defaults."""
from .backend import get_array_module


class AdamW:
    """opt = AdamW(params, lr=1e-3); opt.step(grads).

    params and grads are dicts name -> array; parameters are updated in place.
    For every parameter p with gradient g, at step t = 1, 2, ...:

        p  *= 1 - lr * weight_decay              decoupled decay, on every parameter
        m   = beta1 * m + (1 - beta1) * g        first moment (momentum)
        v   = beta2 * v + (1 - beta2) * g * g    second moment
        p  -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    which is torch's order of operations, so float64 results agree to rounding.
    State (m, v per parameter name, and t) round-trips through state_dict().
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.m = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}

    def step(self, grads):
        """One update of every parameter from grads (same names)."""
        self.t += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.t)
        bias_correction2_sqrt = (1 - beta2 ** self.t) ** 0.5
        for name, p in self.params.items():
            xp = get_array_module(p)
            g, m, v = grads[name], self.m[name], self.v[name]
            p *= 1 - self.lr * self.weight_decay
            m += (1 - beta1) * (g - m)  # = beta1 * m + (1 - beta1) * g, as torch's lerp
            v *= beta2
            v += (1 - beta2) * g * g
            denom = xp.sqrt(v) / bias_correction2_sqrt + self.eps
            p -= step_size * (m / denom)

    def state_dict(self):
        """Everything needed to resume: hyperparameters, t, and m, v by name."""
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "t": self.t,
                "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state):
        """Restore from state_dict(); m and v (host or device arrays) are copied into place."""
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        self.betas = tuple(state["betas"])
        self.t = int(state["t"])
        for name, p in self.params.items():
            xp = get_array_module(p)
            self.m[name][...] = xp.asarray(state["m"][name])
            self.v[name][...] = xp.asarray(state["v"][name])
