"""Does data parallelism pay on one 2-core machine?  Tokens/s of train.py's step, same global batch:

    1 process, 2 threads, --grad-accum-steps 2       (taskset -c 0,1)
    2 ranks, 1 thread each, --grad-accum-steps 1     (mpiexec -n 2 -bind-to core)

for the book's config and for --compact-vocab, in one run; then, on the 2 ranks, what the
two refinements would buy: overlapping the output layer's reduction with the blocks'
backward, and ZeRO-1 (reduce-scatter, each rank updates its half, all-gather), from the
times of their parts.  Medians over the timed steps (the machine may be shared).

    python benchmarks/bench_mpi.py [--steps 12] [--rounds 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # nanograd's threads are the only ones, as in train.py

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanograd.backend import make_rng  # noqa: E402
from nanograd.fast import FastAdamW  # noqa: E402
from transformer.fast_model import FastModel  # noqa: E402
from nanograd.fast.memory import keep_freed_memory  # noqa: E402
from nanograd.fast.mpi import GradientSync, from_environment  # noqa: E402
from nanograd.fast.threads import cpu_threads  # noqa: E402
from transformer.data import default_corpus, get_batch, split, tokenize  # noqa: E402
from transformer.tokenizer import get_tokenizer  # noqa: E402

BOOK = {"d_model": 80, "num_blocks": 6, "num_heads": 4, "batch_size": 2, "context_length": 128,
        "dropout": 0.1, "seed": 1337}
HEAD = ("model_out_linear_layer.weight", "model_out_linear_layer.bias")


def median_ms(seconds):
    return round(1000 * statistics.median(seconds), 1)


def worker(args):
    """One process of a measurement: the training step, timed; prints one JSON line (rank 0)."""
    comm = from_environment()
    world, rank = (comm.size, comm.rank) if comm else (1, 0)
    ids = np.load(args.ids)
    train_data, _ = split(ids)
    h = dict(BOOK, max_token_value=int(ids.max()) + 1)
    keep_freed_memory()  # as train.py
    model = FastModel(h, seed=h["seed"])  # what train.py trains by default
    optimizer = FastAdamW(model.params)
    B, T, seed, k = h["batch_size"], h["context_length"], h["seed"], args.accum
    sync = GradientSync(comm, model.params, k) if comm else None
    flat, views = (sync.flats[0], sync.views[0]) if sync else (None, None)
    head_offset = sum(int(p.size) for name, p in model.params.items() if name not in HEAD)

    def step(s, overlap=False):
        grads = None
        for m, micro in enumerate(sync.micro_steps() if sync else range(k)):
            xb, yb = get_batch(train_data, B, T, np.random.default_rng([seed, 0, s, micro]))
            model.rng = make_rng(np, seed, 1, s, micro)
            model(xb, yb)
            if overlap:  # the output layer's sum starts before the blocks' backward (k = 1)
                requests = []

                def head_ready(g):
                    for name in HEAD:
                        views[name][...] = g[name]
                    requests.append(comm.comm.Iallreduce(comm.MPI.IN_PLACE, flat[head_offset:], op=comm.MPI.SUM))

                model.head_ready = head_ready
                micro_grads = model.backward()
                model.head_ready = None
                for name, g in micro_grads.items():
                    if name not in HEAD:
                        views[name][...] = g
                comm.comm.Allreduce(comm.MPI.IN_PLACE, flat[:head_offset], op=comm.MPI.SUM)
                requests[0].Wait()
                flat[:] *= 1.0 / world
                grads = views
                continue
            micro_grads = model.backward()
            if sync:
                sync.add(m, micro_grads)
            elif grads is None:
                grads = micro_grads if k == 1 else {n: g.copy() for n, g in micro_grads.items()}
            else:
                for n, g in micro_grads.items():
                    grads[n] += g
        if sync and not overlap:
            t = time.perf_counter()
            grads = sync.reduce()
            reduce_times.append(time.perf_counter() - t)
        elif not sync and k > 1:
            for g in grads.values():
                g *= 1.0 / k
        t = time.perf_counter()
        optimizer.step(grads)
        adamw_times.append(time.perf_counter() - t)

    result = {"ranks": world, "threads": cpu_threads(), "accum": k, "params": model.num_params(),
              "vocab": h["max_token_value"], "tokens_per_step": world * k * B * T}
    variants = ["plain"] + (["overlap"] if comm and k == 1 else [])
    raw = {v: {"step": [], "adamw": [], "allreduce": []} for v in variants}
    for s in range(args.warmup + args.steps):
        for variant in variants:  # taken turns, step by step, so a busy spell of the host hits both alike
            reduce_times, adamw_times = [], []
            t = time.perf_counter()
            step(s, variant == "overlap")
            if s >= args.warmup:
                raw[variant]["step"].append(time.perf_counter() - t)
                raw[variant]["adamw"] += adamw_times
                raw[variant]["allreduce"] += reduce_times
    result["raw"] = raw
    if comm:
        result["zero1"] = zero1_parts(comm, model, optimizer, flat, args.steps)
    if rank == 0:
        print(json.dumps(result), flush=True)


def zero1_parts(comm, model, optimizer, flat, repeats):
    """The times ZeRO-1 would trade: one Allreduce of the gradients against a Reduce_scatter
    plus an Allgather of the same bytes, and AdamW over every parameter against over 1/N."""
    MPI, c, n = comm.MPI, comm.comm, comm.size
    count = flat.size - flat.size % n  # equal blocks (the few left over do not change the times)
    shard = np.empty(count // n, dtype=flat.dtype)  # (P/N,)
    times = {"allreduce": [], "reduce_scatter_allgather": [], "adamw_all": [], "adamw_1/N": [], "pack_unpack": []}
    packed = np.empty(model.num_params(), dtype=flat.dtype)  # (P,) the weights, flat, for the all-gather
    grads = {name: np.zeros_like(p) for name, p in model.params.items()}
    names = list(model.params)
    half = set(names[: len(names) - len(HEAD)]) if n == 2 else set(names[::n])  # the blocks and embedding: ~1/2
    for _ in range(repeats):
        c.Barrier()
        t = time.perf_counter()
        c.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        times["allreduce"].append(time.perf_counter() - t)
        c.Barrier()
        t = time.perf_counter()
        c.Reduce_scatter_block(flat[:count], shard, op=MPI.SUM)
        c.Allgather(shard, flat[:count])
        times["reduce_scatter_allgather"].append(time.perf_counter() - t)
        c.Barrier()
        t = time.perf_counter()
        optimizer.step(grads)
        times["adamw_all"].append(time.perf_counter() - t)
        c.Barrier()
        sub = FastAdamW({name: model.params[name] for name in half})
        t = time.perf_counter()
        sub.step({name: grads[name] for name in half})
        times["adamw_1/N"].append(time.perf_counter() - t)
        t = time.perf_counter()  # ZeRO-1 gathers the weights: into one buffer and back out
        offset = 0
        for p in model.params.values():
            packed[offset:offset + p.size] = p.reshape(-1)
            offset += p.size
        offset = 0
        for p in model.params.values():
            p[...] = packed[offset:offset + p.size].reshape(p.shape)
            offset += p.size
        times["pack_unpack"].append(time.perf_counter() - t)
    return times


def measure(args):
    """The parent: tokenize once; per config, `rounds` times each layout in turn, as its own
    process(es); the medians of all the timed steps."""
    ids = tokenize(default_corpus(), get_tokenizer())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    layouts = {"1 process, 2 threads": (["taskset", "-c", "0,1"], 2),
               "2 ranks, 1 thread each": (["mpiexec", "-n", "2", "-bind-to", "core"], 1)}
    table, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            path = os.path.join(tmp, f"{config}.npy")
            np.save(path, ids if config == "book" else np.searchsorted(np.unique(ids), ids))
            pooled = {}
            for _ in range(args.rounds):
                for label, (launcher, accum) in layouts.items():
                    command = [*launcher, sys.executable, os.path.abspath(__file__), "--worker", "--ids", path,
                               "--steps", str(args.steps), "--warmup", str(args.warmup), "--accum", str(accum)]
                    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
                    if out.returncode:
                        sys.exit(f"{label} failed:\n{out.stderr}")
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    into = pooled.setdefault(label, {"info": result, "raw": {}, "zero1": {}})
                    for variant, lists in result["raw"].items():
                        for key, values in lists.items():
                            into["raw"].setdefault(variant, {}).setdefault(key, []).extend(values)
                    for key, values in result.get("zero1", {}).items():
                        into["zero1"].setdefault(key, []).extend(values)
            for label, got in pooled.items():
                info, plain = got["info"], got["raw"]["plain"]
                table.append(f"| {config} (P {info['params']:,}, V {info['vocab']:,}) | {label} | "
                             f"{median_ms(plain['step'])} | {round(info['tokens_per_step'] / statistics.median(plain['step'])):,} | "
                             f"{median_ms(plain['adamw'])} | {median_ms(plain['allreduce']) if plain['allreduce'] else ''} | "
                             f"{len(plain['step'])} |")
                if "overlap" in got["raw"]:
                    z = {key: median_ms(values) for key, values in got["zero1"].items()}
                    saves = z["adamw_all"] - z["adamw_1/N"] - z["pack_unpack"] - (z["reduce_scatter_allgather"] - z["allreduce"])
                    notes.append(f"{config}, 2 ranks: overlapped output-layer reduction {median_ms(got['raw']['overlap']['step'])} ms "
                                 f"a step against {median_ms(plain['step'])} ms plain (turn about, {len(plain['step'])} steps each); "
                                 f"ZeRO-1's parts (ms): {json.dumps(z)}, so ZeRO-1 would save {saves:.1f} ms a step")
    print("| config | layout | step ms (median) | tokens/s | AdamW ms | Allreduce ms | steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    print()
    print("\n".join(notes))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times each layout is launched, in turn")
    parser.add_argument("--configs", nargs="+", choices=["book", "compact"], default=["book", "compact"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else measure(args)


if __name__ == "__main__":
    main()
