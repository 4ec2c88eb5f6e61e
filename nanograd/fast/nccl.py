"""NCCL for CuPy arrays: nanograd/fast/mpi.py's in-place collectives, from GPU memory to GPU memory.

NCCL needs every rank to hold the same 128-byte id before the communicator can form:
rank 0 makes it, MPI broadcasts it (as bytes, in a buffer), then each rank joins with
its rank number.  Each call queues the transfer on the current CUDA stream, after the
kernels that made the gradients and before the AdamW kernels that read them, so no
synchronisation is needed in between.
"""
import numpy as np

ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


def nccl_dtype(nccl, dtype):
    """NCCL's code for a float dtype."""
    codes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
    if np.dtype(dtype) not in codes:
        raise ValueError(f"NCCL collectives here take float32 or float64 arrays, not {np.dtype(dtype)}")
    return codes[np.dtype(dtype)]


def id_to_buffer(unique_id):
    """NCCL's id (CuPy gives a tuple of 128 signed chars) as an int8 array that MPI can broadcast."""
    buf = np.array(unique_id, dtype=np.int8)  # (128,)
    if buf.shape != (ID_BYTES,):
        raise ValueError(f"an NCCL id has {ID_BYTES} bytes, got {buf.shape}")
    return buf


def id_from_buffer(buf):
    """The tuple CuPy's NcclCommunicator takes."""
    return tuple(int(c) for c in buf)


def _current_stream():
    import cupy
    return cupy.cuda.get_current_stream().ptr


class NcclOps:
    """allreduce_sum, send, recv, bcast of contiguous CuPy arrays, in place, over one NCCL communicator."""

    def __init__(self, comm, nccl=None, stream=None):
        """comm: the MPI Communicator (rank, size and the id's broadcast).  nccl: cupy.cuda.nccl;
        stream: a function giving the CUDA stream to queue on (default CuPy's current one)."""
        if nccl is None:
            from .mpi import load_nccl
            nccl = load_nccl()
        self.nccl, self._stream = nccl, stream or _current_stream
        buf = id_to_buffer(nccl.get_unique_id()) if comm.rank == 0 else np.zeros(ID_BYTES, np.int8)  # (128,)
        comm.comm.Bcast(buf, root=0)
        self.comm = nccl.NcclCommunicator(comm.size, id_from_buffer(buf), comm.rank)

    def _args(self, a):
        if not a.flags.c_contiguous:
            raise ValueError("NCCL needs a contiguous array")
        return a.data.ptr, a.size, nccl_dtype(self.nccl, a.dtype)

    def allreduce_sum(self, a):
        ptr, count, dtype = self._args(a)
        self.comm.allReduce(ptr, ptr, count, dtype, self.nccl.NCCL_SUM, self._stream())

    def send(self, a, dest):
        ptr, count, dtype = self._args(a)
        self.comm.send(ptr, count, dtype, dest, self._stream())

    def recv(self, a, source):
        ptr, count, dtype = self._args(a)
        self.comm.recv(ptr, count, dtype, source, self._stream())

    def bcast(self, a, root):
        ptr, count, dtype = self._args(a)
        self.comm.bcast(ptr, count, dtype, root, self._stream())
