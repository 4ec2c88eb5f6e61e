"""nanograd/fast/nccl.py on the CPU: NCCL itself needs GPUs, so a stand-in records what would
reach it; the id's broadcast, the pointers, counts, types and stream are checked."""
import numpy as np
import pytest

from nanograd.fast.nccl import ID_BYTES, NcclOps, id_from_buffer, id_to_buffer


class FakeNccl:
    """cupy.cuda.nccl's names that NcclOps uses; the communicator records its calls."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    made = []

    @staticmethod
    def get_unique_id():
        return tuple(range(-64, 64))  # signed chars, as CuPy gives them

    class NcclCommunicator:
        def __init__(self, size, unique_id, rank):
            FakeNccl.made.append((size, unique_id, rank))
            self.calls = []

        def __getattr__(self, name):  # allReduce, send, recv, bcast
            return lambda *args: self.calls.append((name, *args))


class FakeMpi:
    """An MPI communicator whose Bcast delivers what `delivered` holds (rank 0's id)."""

    def __init__(self, delivered):
        self.delivered = delivered

    def Bcast(self, buf, root):
        assert root == 0 and buf.dtype == np.int8 and buf.shape == (ID_BYTES,)
        if self.delivered is not None:  # None: this is rank 0, whose buffer is the source
            buf[...] = self.delivered


class Rank:
    def __init__(self, rank, size, delivered):
        self.rank, self.size, self.comm = rank, size, FakeMpi(delivered)


class DeviceArray:
    """What NcclOps reads of a CuPy array: flags, size, dtype and data.ptr."""

    def __init__(self, a):
        self.a, self.size, self.dtype, self.flags = a, a.size, a.dtype, a.flags
        self.data = type("Memory", (), {"ptr": a.ctypes.data})()


def test_the_id_crosses_mpi_as_bytes_and_every_rank_joins_with_it():
    unique_id = FakeNccl.get_unique_id()
    assert id_from_buffer(id_to_buffer(unique_id)) == unique_id
    FakeNccl.made.clear()
    for rank in range(3):
        NcclOps(Rank(rank, 3, id_to_buffer(unique_id)), nccl=FakeNccl, stream=lambda: 99)
    assert FakeNccl.made == [(3, unique_id, 0), (3, unique_id, 1), (3, unique_id, 2)]
    with pytest.raises(ValueError, match="128 bytes"):
        id_to_buffer((1, 2, 3))


def test_each_operation_passes_the_arrays_memory_count_type_and_stream():
    ops = NcclOps(Rank(1, 2, id_to_buffer(FakeNccl.get_unique_id())), nccl=FakeNccl, stream=lambda: 99)
    a = DeviceArray(np.zeros(10, np.float32))
    b = DeviceArray(np.zeros(4, np.float64))
    ops.allreduce_sum(a)
    ops.send(b, 0)
    ops.recv(a, 0)
    ops.bcast(b, 1)
    pa, pb = a.data.ptr, b.data.ptr
    assert ops.comm.calls == [("allReduce", pa, pa, 10, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_SUM, 99),  # in place
                              ("send", pb, 4, FakeNccl.NCCL_FLOAT64, 0, 99),
                              ("recv", pa, 10, FakeNccl.NCCL_FLOAT32, 0, 99),
                              ("bcast", pb, 4, FakeNccl.NCCL_FLOAT64, 1, 99)]


def test_only_contiguous_float_arrays_are_sent():
    ops = NcclOps(Rank(0, 2, None), nccl=FakeNccl, stream=lambda: 99)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.allreduce_sum(DeviceArray(np.zeros(4, np.float16)))
    with pytest.raises(ValueError, match="contiguous"):
        ops.allreduce_sum(DeviceArray(np.zeros((4, 4), np.float32)[:, 1]))
    assert ops.comm.calls == []


class FakeRuntime:
    def __init__(self, count):
        self.count, self.device = count, None

    def getDeviceCount(self):
        return self.count

    def setDevice(self, device):
        self.device = device


def a_rank(rank, local_rank):
    """A Communicator without MPI: use_device needs only the rank numbers."""
    from nanograd.fast.mpi import Communicator
    comm = object.__new__(Communicator)
    comm.rank, comm.local_rank = rank, local_rank
    return comm


def test_each_rank_takes_the_gpu_of_its_number_on_its_machine(monkeypatch):
    from types import SimpleNamespace

    from nanograd import backend
    from nanograd.fast import mpi
    from transformer.errors import UserError
    runtime = FakeRuntime(count=2)
    monkeypatch.setattr(backend, "cupy", SimpleNamespace(cuda=SimpleNamespace(runtime=runtime)))
    monkeypatch.setattr(mpi, "load_nccl", lambda: SimpleNamespace(get_version=lambda: 22000))
    a_rank(rank=3, local_rank=1).use_device("cupy")
    assert runtime.device == 1
    with pytest.raises(UserError, match="rank 4 is rank 2 on its machine, which has 2 GPUs; start at most 2"):
        a_rank(rank=4, local_rank=2).use_device("cupy")

    def no_nccl():
        raise ImportError("libnccl.so.2: cannot open shared object file")

    monkeypatch.setattr(mpi, "load_nccl", no_nccl)
    with pytest.raises(UserError, match=r"needs NCCL, which CuPy cannot load \(libnccl.so.2: .*pip install nvidia-nccl"):
        a_rank(rank=0, local_rank=0).use_device("cupy")
    monkeypatch.setattr(mpi, "load_nccl", lambda: SimpleNamespace(available=False))
    with pytest.raises(UserError, match=r"needs NCCL, which CuPy cannot load \(CuPy found no NCCL library\)"):
        a_rank(rank=0, local_rank=0).use_device("cupy")
    runtime.device = None
    a_rank(rank=1, local_rank=1).use_device("numpy")  # NumPy ranks touch no GPU
    assert runtime.device is None


class OneRankMpi:
    """MPI's side of a job of one rank: the NCCL id's broadcast reaches nobody; any other MPI call
    would mean a CuPy array went over MPI instead of NCCL."""

    def Bcast(self, buf, root):
        assert root == 0 and buf.shape == (ID_BYTES,)

    def __getattr__(self, name):
        raise AssertionError(f"MPI's {name} was called: a CuPy array must go over NCCL")


def one_rank():
    """The Communicator of a job of one rank, made without MPI: NCCL forms a communicator of one
    GPU with no mpiexec, so the GPU check proves nccl.py on the one GPU it has."""
    from nanograd.fast.mpi import Communicator
    comm = object.__new__(Communicator)
    comm.MPI, comm.comm = None, OneRankMpi()
    comm.rank, comm.size, comm.local_rank = 0, 1, 0
    comm.checked, comm.nccl = False, None
    return comm


def all_reduce_and_broadcast(comm, arrays, to_host):
    """Each array through Communicator.allreduce_sum and bcast: over one rank both leave it as it was."""
    for a in arrays:
        before = np.array(to_host(a))
        comm.allreduce_sum(a)  # the sum over one rank
        comm.bcast(a, root=0)
        assert np.array_equal(to_host(a), before)


def test_one_rank_goes_through_nccl_ops_with_stand_ins(monkeypatch):
    """What the GPU check's one-rank test runs, with NumPy memory and a recording NCCL for CuPy's."""
    from nanograd.fast import mpi, nccl
    monkeypatch.setattr(mpi, "load_nccl", lambda: FakeNccl)
    monkeypatch.setattr(nccl, "_current_stream", lambda: 0)  # CuPy's default stream
    FakeNccl.made.clear()
    comm = one_rank()
    arrays = [DeviceArray(np.arange(10, dtype=np.float32)), DeviceArray(np.arange(4, dtype=np.float64))]
    all_reduce_and_broadcast(comm, arrays, lambda a: a.a)
    assert FakeNccl.made == [(1, FakeNccl.get_unique_id(), 0)]  # one communicator of one rank, made once
    p32, p64 = (a.data.ptr for a in arrays)
    assert comm.nccl.comm.calls == [("allReduce", p32, p32, 10, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_SUM, 0),
                                    ("bcast", p32, 10, FakeNccl.NCCL_FLOAT32, 0, 0),
                                    ("allReduce", p64, p64, 4, FakeNccl.NCCL_FLOAT64, FakeNccl.NCCL_SUM, 0),
                                    ("bcast", p64, 4, FakeNccl.NCCL_FLOAT64, 0, 0)]


def test_one_rank_nccl_and_gradient_sync_on_cupy(cp):
    """NCCL on this GPU, one rank: the communicator forms, all-reduce and broadcast run on CuPy's
    stream in both dtypes, and GradientSync averages two micro-steps' gradients through it."""
    from nanograd.fast.mpi import GradientSync
    from nanograd.fast.nccl import NcclOps
    comm = one_rank()
    rng = np.random.default_rng(0)
    arrays = [cp.asarray(rng.standard_normal(1000).astype(dtype)) for dtype in (np.float32, np.float64)]  # (1000,)
    all_reduce_and_broadcast(comm, arrays, cp.asnumpy)
    assert isinstance(comm.nccl, NcclOps)
    assert (comm.nccl.comm.size(), comm.nccl.comm.rank_id()) == (1, 0)
    params = {"w": cp.zeros((3, 4), np.float32), "b": cp.zeros(4, np.float32)}
    sync = GradientSync(comm, params, accum_steps=2)
    micro = [{name: cp.asarray(rng.standard_normal(p.shape).astype(np.float32)) for name, p in params.items()}
             for _ in range(2)]
    for m, grads in enumerate(micro):
        sync.add(m, grads)
    mean = sync.reduce()  # one NCCL all-reduce of the flat buffer, then / 2
    cp.cuda.get_current_stream().synchronize()
    for name in params:
        want = (cp.asnumpy(micro[0][name]) + cp.asnumpy(micro[1][name])) / 2
        np.testing.assert_allclose(cp.asnumpy(mean[name]), want, rtol=1e-6)
