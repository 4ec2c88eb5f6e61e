"""nanograd.fast: the speed machinery, kept apart from the reference code it replaces.

Read nanograd/*.py and transformer/model.py to learn the math; read this
package (and transformer/fast_model.py, which plugs it into the model) to
see what it takes to make the same numbers fast.  Every piece names the
plain function it replaces and has a test proving the two equal (bit for
bit, or to rounding where the order of a sum changes):

    piece                                    replaces                                  test
    threads.py  parallel, submit             (running the same work on one thread)     test_fast_threads.py
    kernels.py  kernel_table                 nanograd.block.PLAIN_KERNELS              test_fast_kernels.py
    cpu_kernels.py  (NumPy)                  linear, relu, layernorm, attention:       test_fast_cpu_kernels.py
                                             the same, cut by rows over the cores;
                                             backend.scatter_add of rows
    batch_split.py  (NumPy)                  nanograd.block.blocks_forward/_backward:  test_fast_batch_split.py
                                             the same walk, a share of the batch per core
    memory.py   keep_freed_memory            (glibc handing freed arrays back)         test_fast_memory.py
    linear_cross_entropy.py                  linear_forward + cross_entropy_forward    test_fast_linear_cross_entropy.py
                                             of the output layer, and their backwards
    adamw.py    FastAdamW                    nanograd.adamw.AdamW (adamw_update loop)  test_fast_adamw.py
    cuda_kernels.py  (CuPy only)             layernorm, causal softmax, cross-entropy  test_cuda_kernels.py
                                             one CUDA kernel each; adamw_update for
                                             every parameter in one launch (AdamWTables)
    counter_rng.py  (CuPy's make_rng)        a cuRAND generator per micro-step         test_fast_counter_rng.py
    mpi.py      (mpiexec only)               one process with --grad-accum-steps N*k   test_distributed.py
    nccl.py     (CuPy under mpiexec)         mpi.py's collectives, on GPUs             test_fast_nccl.py

transformer/fast_model.py's FastModel (test_fast_model.py) plugs the kernel
table and the fused head into Model's own walk.  train.py installs the fast
path in one place (make_model_and_optimizer); `python train.py --reference`
trains with the plain Model and AdamW instead.
"""
from .adamw import FastAdamW
