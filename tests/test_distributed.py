"""Data-parallel training (nanograd/fast/mpi.py and its call sites in train.py).

The multi-rank tests launch `mpiexec -n 2` and `-n 3` (oversubscribed on a 2-core machine)
as subprocesses with timeouts; they are skipped, with the reason, where mpiexec or mpi4py
is missing (pip install mpi4py mpich; .ci/run installs both).  The rest run everywhere.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from transformer.settings import accum_per_rank
from nanograd.fast.mpi import (GradientSync, launched_by_mpiexec,
                               launcher_rank)
from transformer.errors import UserError
from transformer.state import load_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
MPI_MISSING = ("mpiexec is not on PATH" if shutil.which("mpiexec") is None else
               "mpi4py is not installed" if importlib.util.find_spec("mpi4py") is None else None)
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=f"{MPI_MISSING}: pip install mpi4py mpich")
TINY = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "16",
        "--batch-size", "4", "--eval-interval", "2", "--eval-iters", "3", "--learning-rate", "3e-3",
        "--no-progress", "--save-interval", "0"]
# Sums of the same float32 numbers grouped differently: a few float32 roundings of the
# largest partial sums apart, after a few AdamW steps.  A wrong micro-batch or scale is O(1) off.
RTOL, ATOL = 1e-4, 1e-6


def clean_env():
    """This environment without a launcher's variables, so a child is not mistaken for a rank."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}


def mpiexec(*programs, cwd, timeout=60):
    """Run `mpiexec -n N prog args : -n M ...`; programs are (n, [argv]) pairs.  The CompletedProcess."""
    command = ["mpiexec"]
    for i, (n, argv) in enumerate(programs):
        command += ([":"] if i else []) + ["-n", str(n), sys.executable, *map(str, argv)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=clean_env())


def python(*argv, cwd, timeout=60):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def step_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("Step: ")]


def assert_same_checkpoint(a, b, exact):
    """Parameters and AdamW moments of two checkpoints, bit for bit or to float32 rounding."""
    (ta, ma), (tb, mb) = load_state(a), load_state(b)
    assert set(ta) == set(tb) and ma["step"] == mb["step"] and ma["adamw"] == mb["adamw"]
    without_time = [{k: v for k, v in m["run"].items() if k != "time_s"} for m in (ma, mb)]  # seconds differ
    assert without_time[0] == without_time[1]  # grad_accum_steps saved as one process's: world-size independent
    for name in ta:
        if exact:
            assert np.array_equal(ta[name], tb[name]), name
        else:
            np.testing.assert_allclose(ta[name], tb[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~2,000 tokens of simple English: a vocabulary under 1,000 ids, so the runs take a second."""
    import test_train  # the generator the end-to-end tests use
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(test_train.english_like(200), encoding="utf-8")
    return path


# ---- without MPI ---------------------------------------------------------------------------

def test_launch_is_recognised_from_the_launchers_variables():
    assert not launched_by_mpiexec({})
    assert launched_by_mpiexec({"PMI_RANK": "1", "PMI_SIZE": "2"})  # MPICH's Hydra
    assert launched_by_mpiexec({"OMPI_COMM_WORLD_SIZE": "2"})  # Open MPI
    assert launcher_rank({"PMI_RANK": "3"}) == 3 and launcher_rank({}) == 0


def test_a_plain_run_never_imports_mpi4py(corpus, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        import train
        assert train.main([*{TINY!r}, "--data", {str(corpus)!r}, "--max-iters", "1", "--out", "m.ckpt"]) == 0
        print("mpi4py" in sys.modules)
    """)
    result = ok(python("-c", code, cwd=tmp_path))
    assert result.stdout.splitlines()[-1] == "False"


def test_started_by_mpiexec_without_mpi4py_is_one_line(corpus, tmp_path):
    blocked = tmp_path / "blocked" / "mpi4py"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("blocked for the test")\n', encoding="utf-8")
    env = {**clean_env(), "PMI_RANK": "0", "PMI_SIZE": "2", "PYTHONPATH": str(blocked.parent)}
    result = subprocess.run([sys.executable, TRAIN, *TINY, "--data", corpus], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "error: this process was started by mpiexec, but mpi4py "
                                                     "cannot be imported (blocked for the test); install it with "
                                                     "pip install -e '.[mpi]'\n")
    env["PMI_RANK"] = "1"  # the other ranks fail alike, silently: one line in all
    result = subprocess.run([sys.executable, TRAIN, *TINY, "--data", corpus], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "")


class OneRank:
    """A communicator of one rank: what GradientSync needs, without MPI."""
    rank, size = 0, 1

    def allreduce_sum(self, a):
        pass


def test_gradient_sync_keeps_one_flat_buffer_and_averages_the_micro_steps():
    params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    sync = GradientSync(OneRank(), params, accum_steps=3)
    flat = sync.flats[0]
    assert len(sync.flats) == 1 and flat.shape == (16,)
    for name, view in sync.views[0].items():  # each gradient is a view of the one buffer
        assert view.shape == params[name].shape and np.shares_memory(view, flat)
    rng = np.random.default_rng(0)
    micro = [{name: rng.standard_normal(p.shape).astype(np.float32) for name, p in params.items()}
             for _ in range(3)]
    for m, grads in enumerate(micro):
        sync.add(m, grads)
    mean = sync.reduce()
    for name in params:  # exactly one process's: a copy of g0, += g1, += g2, then *= 1/3
        expected = micro[0][name].copy()
        expected += micro[1][name]
        expected += micro[2][name]
        expected *= 1.0 / 3
        assert np.array_equal(mean[name], expected), name
    assert list(sync.micro_steps()) == [0, 1, 2]


def test_a_resumed_runs_micro_batches_are_shared_evenly_or_refused():
    assert accum_per_rank(4, 2) == 2 and accum_per_rank(3, 1) == 3
    with pytest.raises(UserError, match="3 micro-batches a step, which 2 ranks cannot share"):
        accum_per_rank(3, 2)


# ---- the communicator on 3 ranks, driven directly -------------------------------------------

DRIVER = """
import sys
import numpy as np
sys.path.insert(0, REPO)
from nanograd.fast.mpi import AgreedError, GradientSync, from_environment
from transformer.errors import UserError

comm = from_environment()
K = 2
SHAPES = {"a": (3, 5), "b": (7,), "c": (4, 2, 3)}


def micro_grads(mu):
    # float32 numbers of very different sizes: a sum regrouped rounds differently
    rng = np.random.default_rng([7, mu])
    return {n: (rng.standard_normal(s) * 10.0 ** rng.uniform(-4, 4, s)).astype(np.float32) for n, s in SHAPES.items()}


params = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
out = {}
for exact in (False, True):
    sync = GradientSync(comm, params, K, exact)
    for m, mu in enumerate(sync.micro_steps()):
        sync.add(m, micro_grads(mu))
    for n, g in sync.reduce().items():
        out[f"{'exact' if exact else 'sum'}/{n}"] = g.copy()

values = np.zeros(10)
for i in comm.share(10):
    values[i] = np.pi * (i + 1)
out["shares"] = comm.allreduce_host(values)

messages = []
try:  # rank 2 disagrees on one field
    comm.check_same({"lr": 1e-3, "seed": 1337 + (comm.rank == 2), "d_model": 16})
except AgreedError as e:
    messages.append(f"{e.speaks}|{e}")
try:  # rank 1 failed to set up; the others reach the check
    if comm.rank == 1:
        comm.fail_setup(UserError("no such file"))
    comm.check_same({"lr": 1e-3})
except AgreedError as e:
    messages.append(f"{e.speaks}|{e}")
comm.check_same({"lr": 1e-3})  # all agree: no error
out["messages"] = np.array(messages)
np.savez(f"rank{comm.rank}.npz", **out)
"""


@needs_mpi
def test_three_ranks_reduce_share_and_agree(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(f"REPO = {REPO!r}\n" + DRIVER, encoding="utf-8")
    ok(mpiexec((3, [script]), cwd=tmp_path))
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(3)]
    rng_grads = {}
    for mu in range(6):  # the same micro-gradients, as one process adds them: in order
        rng = np.random.default_rng([7, mu])
        rng_grads[mu] = {n: (rng.standard_normal(s) * 10.0 ** rng.uniform(-4, 4, s)).astype(np.float32)
                         for n, s in {"a": (3, 5), "b": (7,), "c": (4, 2, 3)}.items()}
    regrouped_differs = False
    for n in ("a", "b", "c"):
        seq = rng_grads[0][n].copy()
        for mu in range(1, 6):
            seq += rng_grads[mu][n]
        pairs = [rng_grads[2 * r][n] + rng_grads[2 * r + 1][n] for r in range(3)]  # each rank's own sum
        regrouped_differs |= not np.array_equal(pairs[0] + pairs[1] + pairs[2], seq)
        seq *= 1.0 / 6
        for r, rank in enumerate(ranks):
            assert np.array_equal(rank[f"exact/{n}"], seq), (r, n)  # rank-ordered: one process's bits
            np.testing.assert_allclose(rank[f"sum/{n}"], seq, rtol=1e-5, atol=1e-6 * np.abs(seq).max())
            assert np.array_equal(rank[f"sum/{n}"], ranks[0][f"sum/{n}"])  # the replicas agree exactly
    assert regrouped_differs  # so the exact mode's bit-equality says something
    for rank in ranks:
        assert np.array_equal(rank["shares"], np.pi * np.arange(1, 11))
    speaks = [[m.split("|")[0] for m in rank["messages"]] for rank in ranks]
    assert speaks == [["True", "False"], ["False", "True"], ["False", "False"]]
    assert ranks[0]["messages"][0].endswith("rank 2's seed differs from rank 0's; every rank must run "
                                             "the same command on the same data")
    assert ranks[1]["messages"][1] == "True|rank 1: no such file"


# ---- train.py under mpiexec -------------------------------------------------------------------

def train_run(corpus, cwd, name, *extra, ranks=None, accum=None):
    """train.py on the corpus, in one process or under mpiexec; its stdout and checkpoint."""
    argv = [TRAIN, *TINY, "--data", corpus, "--out", f"{name}/m.ckpt", *extra]
    if accum:
        argv += ["--grad-accum-steps", accum]
    result = ok(mpiexec((ranks, argv), cwd=cwd) if ranks else python(*argv, cwd=cwd))
    return result.stdout, cwd / name / "m.ckpt"


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process, 2 and 4 micro-batches a step, 4 steps: the runs the ranks must reproduce."""
    cwd = tmp_path_factory.mktemp("single")
    runs = {k: train_run(corpus, cwd, f"k{k}", "--max-iters", 4, "--eval-full", accum=k) for k in (2, 3, 4)}
    runs["reference"] = train_run(corpus, cwd, "reference", "--max-iters", 4, "--eval-full", "--reference", accum=2)
    return cwd, runs


@needs_mpi
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_two_ranks_are_one_process_with_two_micro_batches_bit_for_bit(corpus, single, tmp_path, path):
    flags = ["--reference"] if path == "reference" else []  # the plain Model and AdamW too
    stdout, ckpt = train_run(corpus, tmp_path, "n2", "--max-iters", 4, "--eval-full", *flags, ranks=2)
    one_stdout, one_ckpt = single[1][2 if path == "fast" else "reference"]
    assert step_lines(stdout) == step_lines(one_stdout) and len(step_lines(stdout)) == 3
    assert_same_checkpoint(ckpt, one_ckpt, exact=True)
    records = [json.loads(line) for line in open(ckpt.with_name("m.metrics.jsonl"), encoding="utf-8")]
    one = [json.loads(line) for line in open(one_ckpt.with_name("m.metrics.jsonl"), encoding="utf-8")]
    assert len(records) == len(one) == 3
    for mine, theirs in zip(records, one):  # every logged loss, to the last bit
        assert {k: v for k, v in mine.items() if k != "time_s"} == {k: v for k, v in theirs.items() if k != "time_s"}
    assert "Data parallel: 2 ranks" in stdout and stdout.count("Backend:") == 1  # rank 0 alone prints


@needs_mpi
def test_three_ranks_in_rank_order_are_one_process_bit_for_bit(corpus, single, tmp_path):
    stdout, ckpt = train_run(corpus, tmp_path, "n3", "--max-iters", 4, "--eval-full", "--exact-reduce", ranks=3)
    assert step_lines(stdout) == step_lines(single[1][3][0])
    assert_same_checkpoint(ckpt, single[1][3][1], exact=True)


@needs_mpi
def test_two_ranks_of_two_micro_batches_are_one_process_of_four_to_rounding(corpus, single, tmp_path):
    stdout, ckpt = train_run(corpus, tmp_path, "n2k2", "--max-iters", 4, "--eval-full", ranks=2, accum=2)
    assert len(step_lines(stdout)) == len(step_lines(single[1][4][0])) == 3
    assert_same_checkpoint(ckpt, single[1][4][1], exact=False)


@needs_mpi
def test_a_run_saved_by_two_ranks_resumes_in_one_process_and_back(corpus, single, tmp_path):
    _, half = train_run(corpus, tmp_path, "half", "--max-iters", 2, "--eval-full", ranks=2)  # steps 0, 1
    python_resume = ok(python(TRAIN, "--resume", half, "--max-iters", 4, "--no-progress", cwd=tmp_path))
    assert "Resuming" in python_resume.stdout
    assert_same_checkpoint(half, single[1][2][1], exact=True)  # one process, k = 2, saved by rank 0
    _, half1 = train_run(corpus, tmp_path, "half1", "--max-iters", 2, "--eval-full", accum=2)
    ok(mpiexec((2, [TRAIN, "--resume", half1, "--max-iters", 4, "--no-progress"]), cwd=tmp_path))
    assert_same_checkpoint(half1, single[1][2][1], exact=True)
    refused = mpiexec((3, [TRAIN, "--resume", half1, "--max-iters", 6, "--no-progress"]), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == ("error: the resumed run adds 2 micro-batches a step, which 3 ranks cannot share "
                              "evenly; resume it with a number of processes that divides 2 to keep its batch, "
                              "or pass --grad-accum-steps k to add 3 x k a step instead (a larger or smaller "
                              "batch than the run it continues)\n")


CRASH = """
import os, sys
sys.path.insert(0, REPO)
import train
from transformer.fast_model import FastModel
from transformer.errors import run_command

if os.environ.get("PMI_RANK") == "1":  # a bug on rank 1 alone, at its third backward
    backward, calls = FastModel.backward, []

    def crashing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug on one rank")
        return backward(self, *args, **kwargs)

    FastModel.backward = crashing
run_command(train.main)
"""


@needs_mpi
def test_a_crash_on_one_rank_ends_every_rank(corpus, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(f"REPO = {REPO!r}\n" + CRASH, encoding="utf-8")
    t0 = time.perf_counter()
    result = mpiexec((2, [script, *TINY, "--data", corpus, "--max-iters", 50, "--out", "m.ckpt"]),
                     cwd=tmp_path, timeout=60)
    seconds = time.perf_counter() - t0
    assert result.returncode == 1, (result.returncode, result.stderr)  # MPI_Abort(1) ends the job with it
    assert "rank 1 of 2 failed" in result.stderr and "RuntimeError: a bug on one rank" in result.stderr
    assert seconds < 20, seconds  # a hang would sit in the Allreduce until the timeout
    assert not (tmp_path / "m.ckpt").exists()


@needs_mpi
@pytest.mark.parametrize("rank1, message", [
    (["--d-model", "32"], "error: rank 1's d_model differs from rank 0's; every rank must run the same "
                          "command on the same data\n"),
    (["--data", "other.txt"], "error: rank 1's data_sha256 differs from rank 0's; every rank must run the "
                              "same command on the same data\n"),
    (["--data", "missing.txt"], "error: rank 1: text file missing.txt does not exist; pass the path of a "
                                "UTF-8 text file\n"),
    (["--nope"], "error: rank 1: unrecognized arguments: --nope (see train.py --help)\n"),
], ids=["architecture", "data", "missing-file", "bad-flag"])
def test_a_mismatched_or_failing_rank_is_refused_in_one_line(corpus, tmp_path, rank1, message):
    (tmp_path / "other.txt").write_text(corpus.read_text(encoding="utf-8")[:-200], encoding="utf-8")
    argv = [TRAIN, *TINY, "--data", corpus, "--max-iters", 4, "--out", "m.ckpt"]
    result = mpiexec((1, argv), (1, [*argv, *rank1]), cwd=tmp_path, timeout=60)
    assert (result.returncode, result.stderr) == (2, message)
    assert "Step:" not in result.stdout and not (tmp_path / "m.ckpt").exists()


@needs_mpi
def test_an_error_every_rank_makes_is_printed_once(corpus, tmp_path):
    result = mpiexec((2, [TRAIN, *TINY, "--data", corpus, "--d-model", "0"]), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: --d-model must be a positive integer, got 0.\n")


@needs_mpi
def test_ctrl_c_stops_every_rank_after_the_same_step(corpus, tmp_path):
    argv = [TRAIN, *TINY, "--data", corpus, "--max-iters", 100000, "--eval-interval", 100000, "--out", "m.ckpt"]
    job = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, *map(str, argv)], cwd=tmp_path, env=clean_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stdout:  # training has begun once the first evaluation is printed
            if line.startswith("Step: 0"):
                break
        time.sleep(1)
        job.send_signal(signal.SIGINT)  # what Ctrl-C sends; mpiexec passes it to every rank
        stdout, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, stderr
    saved = [line for line in stdout.splitlines() if line.startswith("Interrupted after step")]
    assert len(saved) == 1  # rank 0 alone speaks, and both ranks stopped: the job ended
    step = int(saved[0].split()[3].rstrip(";"))
    assert load_state(tmp_path / "m.ckpt")[1]["step"] == step > 0


@needs_mpi
def test_a_run_that_blows_up_stops_every_rank_at_the_same_step(corpus, tmp_path):
    result = mpiexec((2, [TRAIN, *TINY, "--data", corpus, "--max-iters", 30, "--learning-rate", "1e30",
                          "--out", "m.ckpt"]), cwd=tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 3 and len(lines) == 1, result.stderr  # both ranks saw it; rank 0 says so
    assert lines[0].startswith("error: at step ") and "is not finite; stopping (nothing was saved)" in lines[0]


@needs_mpi
def test_cupy_ranks_over_nccl_train_as_one_process(cp, corpus, tmp_path):
    """The GPU path: one GPU per rank, gradients over NCCL.  Two ranks where there are two GPUs,
    else one (NCCL still forms its communicator and reduces).  To rounding: CuPy's scatter-add
    adds in whatever order its atomics land."""
    ranks = 2 if cp.cuda.runtime.getDeviceCount() >= 2 else 1
    _, one = train_run(corpus, tmp_path, "one", "--max-iters", 4, "--backend", "cupy", accum=2)
    stdout, many = train_run(corpus, tmp_path, "many", "--max-iters", 4, "--backend", "cupy",
                             ranks=ranks, accum=2 // ranks)
    assert f"Data parallel: {ranks} rank" in stdout and "Backend: cupy" in stdout
    assert_same_checkpoint(many, one, exact=False)
