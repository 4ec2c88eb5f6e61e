"""FastAdamW: nanograd.adamw.AdamW with the same numbers, faster.

Replaces AdamW.step (a loop of adamw_update over the parameters, one NumPy
operation after another over whole arrays) with:

- adamw_update_blocked: the same operations in the same order, a cache-sized
  block at a time, so each element is read and written about once;
- the parameters cut into parts updated by every CPU thread at once
  (nanograd/fast/threads.py);
- start(grads): the output layer's update begun on one thread while
  FastModel.backward walks back through the blocks (FastModel.head_ready);
- the gradients' norm summed while the update reads them, not in a pass of its own;
- a flush of tiny moments every ~170 steps (a CPU denormal fix, see FastAdamW);
- on CuPy, the moments in one flat buffer each and every parameter updated by
  one CUDA launch (cuda_kernels.AdamWTables; two with no_decay), which also sums the squares for the
  norm: a step is a 4 KB copy of gradient addresses, that launch, one sum and one
  read of it, where AdamW makes ~400 launches and reads 137 device scalars.

Bit-identical to AdamW on NumPy: tests/test_fast_adamw.py.
"""
import math
from concurrent.futures import Future

import numpy as np

from ..adamw import AdamW
from ..backend import get_array_module
from . import cuda_kernels
from .threads import submit

BLOCK = 1 << 16  # elements per block: p, m, v, g and scratch (5 x 256 KB) stay in L2 cache
PART = 1 << 20   # elements per task handed to a CPU thread
TINY = 1e-30     # moments smaller than this are set to 0 now and then: see FastAdamW


def adamw_update_blocked(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """adamw_update on flat NumPy arrays, block by block, with no temporaries.

    The same operations in the same order, but each block of BLOCK
    elements goes through all of them while it sits in cache, so memory
    is read and written about once instead of once per operation.
    Returns the sum of g's squares, taken on the way (see AdamW.step).
    """
    p, g, m, v = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)  # views
    scratch = np.empty(min(BLOCK, p.size), p.dtype)
    decay, step_size = 1 - lr * weight_decay, lr / (1 - beta1 ** t)
    bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
    squares = 0.0
    for start in range(0, p.size, BLOCK):
        b = slice(start, start + BLOCK)
        pb, gb, mb, vb = p[b], g[b], m[b], v[b]
        tmp = scratch[: pb.size]
        squares += float(np.dot(gb, gb))
        pb *= decay
        np.subtract(gb, mb, out=tmp)
        tmp *= 1 - beta1
        mb += tmp
        vb *= beta2
        np.multiply(gb, 1 - beta2, out=tmp)
        tmp *= gb
        vb += tmp
        np.sqrt(vb, out=tmp)
        tmp /= bias_correction2_sqrt
        tmp += eps
        np.divide(mb, tmp, out=tmp)
        tmp *= step_size
        pb -= tmp
    return squares


def element_groups(sizes, part):
    """Cut flat arrays of the given sizes into groups of about `part` elements, one thread task each.

    Returns [[(array index, start, stop), ...], ...]: a big array is cut into
    several pieces, small ones share a group, so each task is worth a thread hand-off.
    """
    groups, size = [[]], 0
    for i, n in enumerate(sizes):
        for start in range(0, n, part):
            if size >= part:
                groups.append([])
                size = 0
            groups[-1].append((i, start, min(start + part, n)))
            size += min(part, n - start)
    return [group for group in groups if group]


def _update_group(group):
    """adamw_update_blocked on each ((p, g, m, v), settings) of group: one CPU thread's task.
    Returns the sum of the squares of the group's gradients."""
    return sum(adamw_update_blocked(*arrays, *settings) for arrays, settings in group)


class FastAdamW(AdamW):
    """AdamW (same constructor, state and numbers), updated block by block on every CPU thread,
    or on CuPy by one CUDA launch for every parameter.

    On NumPy, one departure from torch: every flush_interval() steps, moments smaller
    than TINY (1e-30) are set to 0.  A moment whose gradient stays 0, as an
    embedding row whose token stops appearing, shrinks by beta each step and
    after ~800 steps (beta1 0.9, from 1e-4) falls below 1.2e-38, into float32's
    denormal range, where each operation on x86 takes ~100 cycles (8M such
    moments made an update 6x slower; train.py on the built-in corpus had 114K
    of them in the embedding by step 1500, and more each step).  Zeroing them
    first changes an update by at most lr * TINY / eps = 1e-25, below float32's
    rounding of any weight.
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.started = set()  # names whose update in this step start() has begun
        self.squares = []  # this step's sums of squared gradient elements so far, or futures of them
        self.tables = None  # CuPy: [(cuda_kernels.AdamWTables, the names it updates)]
        arrays = list(params.values())
        if arrays and not isinstance(arrays[0], np.ndarray):
            self._flatten_moments(arrays)

    def _flatten_moments(self, arrays):
        """CuPy: m and v become views into one flat buffer each, and one AdamWTables covers
        every parameter.  (state_dict and load_state_dict go through the views as before.)"""
        xp, dtype = get_array_module(arrays[0]), arrays[0].dtype
        offsets = np.cumsum([0] + [p.size for p in arrays])
        self.flat_m = xp.zeros(int(offsets[-1]), dtype=dtype)  # (total,)
        self.flat_v = xp.zeros(int(offsets[-1]), dtype=dtype)  # (total,)
        names = list(self.params)
        self.m = {n: self.flat_m[o:o + p.size].reshape(p.shape) for n, p, o in zip(names, arrays, offsets)}
        self.v = {n: self.flat_v[o:o + p.size].reshape(p.shape) for n, p, o in zip(names, arrays, offsets)}
        self.tables = []  # (AdamWTables, names): one launch for the decayed parameters, one for the rest
        for group in ([n for n in names if n not in self.no_decay], [n for n in names if n in self.no_decay]):
            if group:
                tables = cuda_kernels.AdamWTables(*([d[n] for n in group] for d in (self.params, self.m, self.v)))
                self.tables.append((tables, group))

    def step(self, grads):
        """One update of every parameter from grads (same names).  Returns the
        gradients' global norm, sqrt(sum of every element squared), summed
        while the update reads them: a separate pass over 66 MB of gradients
        (the book's config) would cost more than the sums.  train.py stops a
        run whose norm is not finite.

        On NumPy the parameters are cut into parts of at most PART elements,
        small parameters grouped together, and the CPU threads update the
        parts at once (elementwise, so any cut gives the same numbers).
        Parameters whose update start() began are only waited for.

        On CuPy every parameter is updated by one launch, and no moment is
        flushed: a GPU handles denormal numbers at full speed, so the flush
        would only cost a pass over the moments.
        """
        if self.tables is not None:
            self.t += 1
            self.started = set()
            squares = [tables.step([grads[name] for name in group], self.lr, *self.betas, self.eps,
                                   self.decay(group[0]), self.t) for tables, group in self.tables]  # (blocks,) each
            return math.sqrt(sum(float(s.sum()) for s in squares))
        self._launch({name: grads[name] for name in self.params if name not in self.started}, split=True)
        squares = [s.result() if isinstance(s, Future) else s for s in self.squares]  # waits for the threads
        self.started, self.squares = set(), []
        interval = self.flush_interval()
        if interval and self.t % interval == 0:
            for moment in (*self.m.values(), *self.v.values()):
                moment[get_array_module(moment).abs(moment) < TINY] = 0
        return math.sqrt(float(sum(squares)))

    def start(self, grads):
        """Begin this step's update of the parameters named in grads, and return at once:
        on NumPy one CPU thread works on it meanwhile, leaving the caller a core (so grads
        and these parameters must not change until step() returns).  step() updates the
        others and waits.

        train.py starts the output layer's update (half of the parameters) while the model
        walks back through the blocks, whose small operations keep only one core busy.
        On CuPy it does nothing: step() updates every parameter in one launch.
        """
        if self.tables is None:
            self._launch(grads, split=False)

    def _launch(self, grads, split):
        """Queue the updates of grads' parameters: as one thread task, or split over every CPU thread."""
        if grads and not self.started:  # the step's first update
            self.t += 1
        self.started.update(grads)
        flat = []  # (p, g, m, v) of each NumPy parameter, as 1-D views (p, m, v are contiguous), and its settings
        for name, g in grads.items():
            arrays = (self.params[name], g, self.m[name], self.v[name])
            flat.append(([a.reshape(-1) for a in arrays], (self.lr, *self.betas, self.eps, self.decay(name), self.t)))
        groups = element_groups([arrays[0].size for arrays, _ in flat], PART)
        tasks = [[([a[start:stop] for a in flat[i][0]], flat[i][1]) for i, start, stop in group] for group in groups]
        if tasks and not split:
            tasks = [sum(tasks, [])]  # one task: the parts one after another
        self.squares += submit([(_update_group, task) for task in tasks])

    def flush_interval(self):
        """Steps within which a moment of at least TINY, decaying by beta1 or beta2 a step,
        stays above float32's smallest normal number (173 for beta1 0.9); None when no beta decays."""
        decays = [beta for beta in self.betas if 0 < beta < 1]
        if not decays:
            return None
        return max(1, int(math.log(np.finfo(np.float32).tiny / TINY) / math.log(min(decays))))

