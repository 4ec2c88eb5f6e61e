"""Data-parallel training over MPI: N processes, one replica of the model each, one training.

    mpiexec -n 2 python train.py --grad-accum-steps 1    # the same run as: python train.py --grad-accum-steps 2

Each step runs N x k micro-batches (k = --grad-accum-steps), numbered 0 .. N*k - 1; rank r
runs numbers r*k .. r*k + k - 1, drawing the batches and dropout masks one process with
--grad-accum-steps N*k draws for those numbers.  A rank adds its k micro-gradients into one
flat buffer, without communicating; then one Allreduce sums the N buffers in place, every
rank scales the sum by 1 / (N*k) and takes the same AdamW step, so the replicas stay equal
without ever sending a weight (llm.c and nanoGPT's DDP do the same; ZeRO-1 and the overlap
were measured and did not pay here: benchmarks/results/mpi.md).

One process adds the micro-gradients in order, g0 + g1 + ... ; with N = 2 and k = 1 the
Allreduce computes g0 + g1 too, so the two runs agree bit for bit.  Otherwise the sum is
grouped differently and agrees to float32 rounding, unless `exact` is asked for: then the
ranks pass a running sum along, rank 0 to rank N-1, each adding its micro-gradients in
order, and rank N-1 broadcasts it.  Slower (N-1 transfers one after another), but exact.

mpi4py is imported only when the process was started by mpiexec (from_environment), so
a plain `python train.py` needs no MPI.  CuPy arrays go over NCCL (nanograd/fast/nccl.py),
GPU to GPU; everything else, and all small messages, over MPI.  Only the buffer methods
(upper case: Allreduce, Bcast, Send) are used: they send the array's bytes, never a pickle.

A failure must not leave the other ranks waiting in a collective forever: a user error
found while setting up is agreed on by all ranks at the start check (check_same), so every
rank exits with status 2 and one of them prints it; any later failure on one rank calls
MPI_Abort, which ends every rank of the job (as `python -m mpi4py` does).

docs/distributed.md has the launch commands, what each collective moves and a cost model.
"""
import contextlib
import copy
import hashlib
import io
import os
import sys
import time
import traceback

import numpy as np

from ..backend import BackendError, get_array_module, to_host
from ..errors import UserError

# Seconds between a failing rank's last message and MPI_Abort: the launcher forwards each rank's
# output through a pipe and stops when the job is aborted, so a traceback written just before
# could be lost (it was, now and then, in tests/test_distributed.py).
ABORT_GRACE_S = 0.5
# Set by the launchers in every process they start: MPICH / Intel MPI (Hydra), Open MPI, PMIx.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launched_by_mpiexec(environ=os.environ):
    """True when a launcher such as mpiexec started this process."""
    return any(name in environ for name in LAUNCHER_VARIABLES)


def launcher_rank(environ=os.environ):
    """This process's rank as the launcher told it (0 when it did not): usable before MPI starts."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def from_environment(environ=os.environ):
    """A Communicator over every rank if mpiexec started this process, else None (no MPI loaded)."""
    if not launched_by_mpiexec(environ):
        return None
    try:
        from mpi4py import MPI
    except ImportError as e:  # every rank fails alike: rank 0 alone says so
        raise AgreedError(f"this process was started by mpiexec, but mpi4py cannot be imported ({e}); "
                          "install it with pip install -e '.[mpi]'", speaks=launcher_rank(environ) == 0) from None
    return Communicator(MPI.COMM_WORLD)


class AgreedError(UserError):
    """A failure that every rank knows of: each exits with status 2, and only the rank that `speaks` prints."""

    def __init__(self, message, speaks):
        super().__init__(message)
        self.speaks = speaks


def digest(text):
    """A 63-bit fingerprint of text, for comparing settings across ranks."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def fingerprint(arrays):
    """A fingerprint of the bytes of host arrays, in order (e.g. the initial parameters)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


class Communicator:
    """The job's ranks: who we are (rank, size, local_rank) and the few operations training needs.

    allreduce_sum, send, recv and bcast move NumPy arrays over MPI and CuPy arrays over
    NCCL; all of them work in place on contiguous arrays.
    """

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank = node.Get_rank()  # picks this rank's GPU
        node.Free()
        self.checked = False  # check_same done: from now on a failure on one rank aborts the job
        self.nccl = None  # made at the first collective on a CuPy array

    # ---- the collectives, in place ------------------------------------------------------
    def _device(self, a):
        """NCCL if a is a CuPy array (made on first use, by every rank at once), else None."""
        if isinstance(a, np.ndarray):
            return None
        if self.nccl is None:
            from .nccl import NcclOps
            self.nccl = NcclOps(self)
        return self.nccl

    def allreduce_sum(self, a):
        """a = the sum of every rank's a, on every rank."""
        if device := self._device(a):
            return device.allreduce_sum(a)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)

    def send(self, a, dest):
        """a to rank dest (which calls recv)."""
        if device := self._device(a):
            return device.send(a, dest)
        self.comm.Send(a, dest=dest)

    def recv(self, a, source):
        """a = what rank source sends."""
        if device := self._device(a):
            return device.recv(a, source)
        self.comm.Recv(a, source=source)

    def bcast(self, a, root=0):
        """a = root's a, on every rank."""
        if device := self._device(a):
            return device.bcast(a, root)
        self.comm.Bcast(a, root=root)

    def share(self, n):
        """This rank's items of range(n), dealt round-robin (rank, rank + size, ...)."""
        return range(self.rank, n, self.size)

    def allreduce_host(self, values):
        """The sum over ranks of a few host numbers, as a float64 array, on every rank.  Given
        values that only one rank filled in (its share(n), 0 elsewhere), the result holds
        exactly those numbers, since adding zeros is exact."""
        values = np.array(values, dtype=np.float64)  # (n,) a copy: the buffer MPI writes into
        self.allreduce_sum(values)
        return values

    # ---- starting and failing together ----------------------------------------------------
    def use_device(self, backend):
        """Before CuPy starts: one GPU per rank, numbered by the rank on its machine; and NCCL
        checked now, while a failure is still agreed on at the start check."""
        if backend != "cupy":
            return
        from nanograd import backend as backends
        cupy = backends.cupy
        if cupy is None:
            return  # get_backend says why, on every rank
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:
            return  # the driver is unreachable: get_backend says why
        if self.local_rank >= count:
            raise UserError(f"rank {self.rank} is rank {self.local_rank} on its machine, which has "
                            f"{count} GPU{'s' if count != 1 else ''}; start at most {count} ranks per machine")
        cupy.cuda.runtime.setDevice(self.local_rank)
        try:
            nccl = load_nccl()
            if not getattr(nccl, "available", True):  # CuPy's import never fails: it says so here
                raise ImportError("CuPy found no NCCL library")
            nccl.get_version()
        except Exception as e:
            raise UserError(f"--backend cupy under mpiexec needs NCCL, which CuPy cannot load ({e}); install "
                            "it with pip install nvidia-nccl-cu12 (or -cu13, to match your CuPy)") from None

    def parse(self, parse_args, argv):
        """parse_args(argv) with its messages held back: --help is printed once, by rank 0, and
        a bad flag becomes a UserError, agreed on at the start check like any other."""
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return parse_args(argv)
        except SystemExit as e:
            if e.code in (0, None):
                if self.rank == 0:
                    sys.stdout.write(out.getvalue())
                raise
            raise UserError(err.getvalue().strip().removeprefix("error: ")) from None

    def check_same(self, fields):
        """Collective, once, when every rank has set up: AgreedError unless all ranks have
        the same fields (name -> value: settings, parameter count, data checksum).
        Every rank raises it; rank 0 names the first rank and field that differ."""
        self._agree(None, fields)

    def fail_setup(self, error):
        """Collective: this rank could not set up (error); the others learn it at check_same.
        Raises AgreedError, spoken by the lowest rank that failed."""
        self._agree(error, {})

    def _agree(self, error, fields):
        """The start check's exchange: each rank's failure flag and fingerprints of its fields."""
        keys = sorted(fields)
        digests = np.array([digest(f"{key}={fields[key]!r}") for key in keys], dtype=np.int64)  # (F,)
        mine = np.array([error is not None, len(keys), digest(repr(keys) + digests.tobytes().hex())],
                        dtype=np.int64)  # (3,) failed, field count, all fields
        rows = np.empty((self.size, 3), dtype=np.int64)  # (N, 3)
        self.comm.Allgather(mine, rows)
        self.checked = True
        failed = np.flatnonzero(rows[:, 0])  # (failures,)
        if failed.size:  # the lowest rank that failed says why; rank 0 without naming itself
            message = f"rank {self.rank}: {error}" if self.rank else str(error)
            raise AgreedError(message if error is not None else "", speaks=self.rank == failed[0])
        if (rows[:, 2] == rows[0, 2]).all():
            return
        other = int(np.flatnonzero(rows[:, 2] != rows[0, 2])[0])
        what = "settings"
        if (rows[:, 1] == rows[0, 1]).all():
            table = np.empty((self.size, len(keys)), dtype=np.int64)  # (N, F)
            self.comm.Allgather(digests, table)
            what = keys[int(np.flatnonzero(table[other] != table[0])[0])]
        raise AgreedError(f"rank {other}'s {what} differ{'s' if what != 'settings' else ''} from rank 0's; "
                          "every rank must run the same command on the same data", speaks=self.rank == 0)

    def report(self, error):
        """Exit status 2 for a UserError, printed once across the ranks; or, for a failure on
        this rank alone after the start check, print it and end every rank (MPI_Abort)."""
        if not isinstance(error, AgreedError) and not self.checked:
            try:
                self.fail_setup(error)
            except AgreedError as agreed:
                error = agreed
        if isinstance(error, AgreedError):
            if error.speaks:
                print(f"error: {error}", file=sys.stderr, flush=True)
            return 2
        print(f"error: rank {self.rank}: {error}", file=sys.stderr, flush=True)
        self.abort(2)

    def agree_on_signals(self, interrupts):
        """Collective, once a step: a copy of interrupts (train.py's Interrupts) whose signals are
        the same on every rank, the first one any rank received (in rank order), or none.  So all
        ranks stop after the same step; one stopping alone would leave the others waiting."""
        mine = np.zeros(self.size)  # (N,) each rank's first signal number, 0 for none
        mine[self.rank] = interrupts.received[0] if interrupts.received else 0
        everyone = self.allreduce_host(mine)  # (N,)
        agreed = copy.copy(interrupts)  # a snapshot: a signal arriving now counts at the next step
        agreed.received = [int(n) for n in everyone if n][:1]
        return agreed

    def abort(self, code):
        """End every rank of the job now, with exit status code."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # mpiexec forwards the ranks' output; at the abort it stops
        self.comm.Abort(code)


def load_nccl():
    """cupy.cuda.nccl, imported on first use."""
    from cupy.cuda import nccl
    return nccl


class NoOutputs:
    """What ranks other than 0 have in place of train.py's RunOutputs: they write no files."""

    def check(self):
        pass

    def claim(self):
        pass

    def check_present(self, step):
        pass

    def log(self, record):
        pass

    def logged(self, step):
        return False  # rank 0 reads the metrics file; train.py shares its answer

    def release(self):
        pass


@contextlib.contextmanager
def quiet_unless_first(comm):
    """Ranks other than 0 print nothing in the block (their stdout and stderr go to os.devnull)."""
    if comm is None or comm.rank == 0:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


@contextlib.contextmanager
def abort_on_error(comm):
    """An unexpected exception in the block, on any rank, prints its traceback and ends the job
    (MPI_Abort) instead of leaving the other ranks waiting; without MPI (comm None) it just passes."""
    try:
        yield
    except (UserError, BackendError):
        raise  # the caller reports these (Communicator.report)
    except Exception:
        if comm is None:
            raise
        print(f"rank {comm.rank} of {comm.size} failed:", file=sys.stderr)
        traceback.print_exc()
        comm.abort(1)


def start_data_parallel(comm, model, s, args, start, data_sha):
    """Collective, once every rank has set up the run: all ranks have the same settings, data and
    weights, or all stop here (check_same).  Returns the run's GradientSync."""
    comm.check_same({**s, "data": None, "data_sha256": data_sha, "parameters": model.num_params(),
                     "start": start, "backend": args.backend, "reference": args.reference,
                     "exact_reduce": args.exact_reduce,
                     "weights": fingerprint(to_host(p) for p in model.params.values())})
    k = s["grad_accum_steps"]
    print(f"Data parallel: {comm.size} ranks, each {k} micro-batch{'es' if k > 1 else ''} a step"
          f"{', gradients added in rank order' if args.exact_reduce else ''}")
    return GradientSync(comm, model.params, k, args.exact_reduce)


class GradientSync:
    """The gradient side of data parallelism: k micro-steps added locally, one reduction per step.

    The gradients live in one flat buffer (a single message), each parameter's seen through
    a view shaped like it.  In exact mode each micro-step keeps a buffer of its own, and a
    rank other than 0 one more to receive the running sum.
    """

    def __init__(self, comm, params, accum_steps, exact=False):
        self.comm, self.k = comm, accum_steps
        self.exact = exact and comm.size > 1  # one rank adds in order anyway
        self.total = comm.size * accum_steps  # micro-batches per step, all ranks together
        first = next(iter(params.values()))
        xp = get_array_module(first)
        count = sum(int(p.size) for p in params.values())
        copies = accum_steps + (comm.rank > 0) if self.exact else 1
        self.flats = [xp.empty(count, dtype=first.dtype) for _ in range(copies)]  # (P,) each
        self.views = [self._views(flat, params) for flat in self.flats]

    @staticmethod
    def _views(flat, params):
        """name -> a view of flat shaped like the parameter, in params' order."""
        views, offset = {}, 0
        for name, p in params.items():
            views[name] = flat[offset:offset + p.size].reshape(p.shape)  # a view: flat's memory
            offset += p.size
        return views

    def micro_steps(self):
        """This rank's global micro-batch numbers in a step: the ones one process would run as these."""
        return range(self.comm.rank * self.k, (self.comm.rank + 1) * self.k)

    def add(self, m, grads):
        """This rank's m-th micro-step's gradients (a dict like params) into the buffer: no communication."""
        views = self.views[m if self.exact else 0]
        for name, g in grads.items():
            if m == 0 or self.exact:
                views[name][...] = g
            else:
                views[name] += g

    def reduce(self):
        """The mean gradient of the step's N*k micro-batches, the same on every rank: a dict of views."""
        if self.exact:
            out = self._ordered_sum()
        else:
            out = 0
            self.comm.allreduce_sum(self.flats[0])
        self.flats[out] *= 1.0 / self.total  # the mean: as one process scales its sum
        return self.views[out]

    def _ordered_sum(self):
        """Sum the micro-gradients one at a time in global order, g0 + g1 + ..., passing the
        running sum from rank to rank; the buffer that holds it, on every rank."""
        rank, size, k = self.comm.rank, self.comm.size, self.k
        if rank == 0:
            out, own = 0, self.flats[1:k]
        else:
            out, own = k, self.flats[:k]
            self.comm.recv(self.flats[out], source=rank - 1)  # ranks 0 .. rank-1's sum
        for part in own:
            self.flats[out] += part
        if rank < size - 1:
            self.comm.send(self.flats[out], dest=rank + 1)
        self.comm.bcast(self.flats[out], root=size - 1)
        return out
