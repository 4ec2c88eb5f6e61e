"""Train the book's Transformer (ch.19 train.py), every gradient computed by hand.

    python train.py                                  # built-in corpus, the book's settings
    python train.py --data my.txt --backend cupy     # your text, on an NVIDIA GPU
    python train.py --resume model/model.ckpt        # continue an interrupted run
    python train.py --reference                      # the plain Model and AdamW (slower, same numbers)
    python train.py --overwrite                      # start again over model/model.ckpt
    mpiexec -n 2 python train.py                     # 2 processes, one training (docs/distributed.md)

Reads top to bottom like the book's: settings, data, model, optimizer,
the loop (evaluate, batch, forward, backward, step), save.  By default the
model and optimizer are the fast twins from nanograd/fast/ (FastModel,
FastAdamW); --reference trains with transformer/model.py's Model and
nanograd/adamw.py's AdamW, the code to read.
"""
import hashlib
import math
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while the imports load: stop quietly (run_command resets it)

# nanograd splits its big kernels over the CPU cores itself; a BLAS that also ran threads
# would fight it for the same cores (and its idle threads spin).  Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from nanograd import AdamW
from nanograd.backend import BackendError, get_backend, make_rng, to_host
from nanograd.clip import clip_grad_norm
from nanograd.fast import FastAdamW, FastModel
from nanograd.fast.mpi import (GradientSync, NoOutputs, abort_on_error, accum_per_rank, fingerprint,
                               from_environment, quiet_unless_first)
from nanograd.fast.threads import cpu_threads
from transformer import Model
from transformer.checkpoint import save_checkpoint
from transformer.data import check_splits, default_corpus, get_batch, read_text, split, tokenize
from transformer.errors import CheckpointError, OneLineParser, UserError, run_command
from transformer.outputs import DEFAULT_OUT, Interrupts, RunOutputs
from transformer.schedule import learning_rate
from transformer.state import check_resumable, load_params, load_state, restore_optimizer, state_contents
from transformer.tokenizer import get_tokenizer
from transformer.validate import check_finite_settings, check_seed, check_training_memory

# The book's h_params (ch.19), each with a flag of the same name.
BOOK_H_PARAMS = {
    "d_model": 80, "num_blocks": 6, "num_heads": 4,
    "batch_size": 2, "context_length": 128, "max_iters": 500, "learning_rate": 1e-3,
    "dropout": 0.1, "eval_interval": 50, "eval_iters": 10, "seed": 1337,
}
# The rest of the run's settings and their defaults.
RUN_DEFAULTS = {
    "dtype": "float32", "data": None, "save_interval": None,  # None: every eval_interval
    "lr_schedule": "constant", "warmup_iters": 0, "min_lr": 0.0,
    "grad_clip": 0.0, "grad_accum_steps": 1, "eval_full": False, "compact_vocab": False,
}
ARCHITECTURE = ("d_model", "num_blocks", "num_heads", "context_length", "dropout")


def parse_args(argv):
    parser = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    for key, value in BOOK_H_PARAMS.items():  # default None: "not given", so --resume can tell
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                            help=f"the book's default: {value}")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default float32")
    parser.add_argument("--data", default=None, help="UTF-8 text file (default: the built-in corpus)")
    parser.add_argument("--out", default=None, help="checkpoint path (default model/model.ckpt, or --resume's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's checkpoint and metrics at --out (refused otherwise)")
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue the run saved in CKPT")
    parser.add_argument("--save-interval", type=int, default=None,
                        help="save every N steps (default: at every evaluation; 0: only at the end)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None)
    parser.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up steps (default 0)")
    parser.add_argument("--min-lr", type=float, default=None, help="cosine's final rate (default 0)")
    parser.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm (0: off)")
    parser.add_argument("--grad-accum-steps", type=int, default=None, help="micro-batches per step (default 1)")
    parser.add_argument("--eval-full", action="store_true", default=None,
                        help="also compute the exact loss over the whole validation split")
    parser.add_argument("--compact-vocab", action="store_true", default=None,
                        help="renumber the corpus's token ids densely (a much smaller output layer)")
    parser.add_argument("--wandb", nargs="?", const="LLMZhang_lesson_2", default=None, metavar="PROJECT",
                        help="log to Weights & Biases (WANDB_MODE=offline works without an account)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--reference", action="store_true",
                        help="train with the plain Model and AdamW (the code to read; slower, same numbers)")
    parser.add_argument("--exact-reduce", action="store_true",
                        help="under mpiexec: add the ranks' gradients in rank order, so the run equals one "
                             "process's bit for bit (slower)")
    return parser.parse_args(argv)


def resolve_settings(args, saved):
    """Flags given now win, then the resumed run's settings, then the defaults."""
    settings = {}
    for key, default in {**BOOK_H_PARAMS, **RUN_DEFAULTS}.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else saved.get(key, default)
        kind = {bool: bool, int: int, float: (int, float), str: str}.get(type(default))
        if kind and not isinstance(settings[key], kind) or kind is int and isinstance(settings[key], bool):
            raise CheckpointError(f"checkpoint {args.resume} stores a malformed {key} ({settings[key]!r}); "
                                  "it cannot be resumed, but inference.py can still use it")
    if args.resume:
        for key in ARCHITECTURE + ("compact_vocab", "dtype"):
            if getattr(args, key) is not None and getattr(args, key) != saved.get(key):
                raise UserError(f"--{key.replace('_', '-')} differs from the checkpoint's "
                                f"({saved.get(key)!r}); a resumed run keeps its model")
    if settings["save_interval"] is None:
        settings["save_interval"] = settings["eval_interval"]
    return settings


def check_settings(s):
    """UserError naming the first setting that cannot work."""
    for key in ("d_model", "num_blocks", "num_heads", "batch_size", "context_length", "max_iters",
                "eval_interval", "eval_iters", "grad_accum_steps"):
        if s[key] <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {s[key]}.")
    for key in ("save_interval", "warmup_iters"):
        if s[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must be 0 or more, got {s[key]}.")
    if s["d_model"] % s["num_heads"]:
        raise UserError(f"--d-model ({s['d_model']}) must be divisible by --num-heads ({s['num_heads']}).")
    if not 0.0 <= s["dropout"] < 1.0:
        raise UserError(f"--dropout must lie in [0, 1), got {s['dropout']}.")
    if not s["learning_rate"] > 0:
        raise UserError(f"--learning-rate must be greater than 0, got {s['learning_rate']}.")
    if not 0 <= s["min_lr"] <= s["learning_rate"]:
        raise UserError(f"--min-lr must lie in [0, --learning-rate], got {s['min_lr']}.")
    if not s["grad_clip"] >= 0:
        raise UserError(f"--grad-clip must be 0 (off) or positive, got {s['grad_clip']}.")
    check_seed(s["seed"])
    check_finite_settings(s)


def describe_backend(xp):
    if xp is np:
        cores = cpu_threads()
        return f"Backend: numpy {np.__version__} on the CPU ({cores} core{'s' if cores > 1 else ''})"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"Backend: cupy {xp.__version__} on {name} (CUDA runtime {xp.cuda.runtime.runtimeGetVersion()})"


def full_loss(model, data, context_length, batch_size, comm=None):
    """Mean loss over every token of data in order: consecutive windows of context_length,
    batch_size of them per forward, then the shorter rest.  Under MPI the forwards are
    shared among the ranks and their sums added in the same order as one process."""
    n = len(data) - 1  # positions that have a next token
    T, windows = context_length, n // context_length
    firsts = range(0, windows, batch_size)
    rest = n - windows * T
    sums = np.zeros(len(firsts) + 1)  # (forwards + 1,) each forward's summed loss, then the rest's
    for i in comm.share(len(sums)) if comm else range(len(sums)):
        if i < len(firsts):
            starts = np.arange(firsts[i], min(firsts[i] + batch_size, windows))[:, None] * T  # (B, 1)
            index = starts + np.arange(T)  # (B, T)
            sums[i] = model(data[index], data[index + 1])[1] * index.size
        elif rest:
            sums[i] = model(data[windows * T:n][None], data[windows * T + 1:][None])[1] * rest
    if comm:
        sums = comm.allreduce_host(sums)
    total = 0.0
    for value in sums:
        total += value
    return float(total / n)


def make_model_and_optimizer(h_params, backend, s, reference, ranks=1):
    """The model and AdamW: the fast twins (nanograd/fast/), or with reference the plain ones."""
    if reference:
        model = Model(h_params, backend=backend, dtype=s["dtype"], seed=s["seed"])
        return model, AdamW(model.params, lr=s["learning_rate"])
    model = FastModel(h_params, backend=backend, dtype=s["dtype"], seed=s["seed"])
    optimizer = FastAdamW(model.params, lr=s["learning_rate"])
    if s["grad_accum_steps"] == 1 and not s["grad_clip"] and ranks == 1:  # AdamW need not see every gradient first:
        model.head_ready = optimizer.start  # it begins on the output layer mid-backward
    return model, optimizer


def train_step(model, optimizer, micro_batches, grad_clip, sync=None):
    """One step of the book's loop: forward and backward of each micro-batch (inputs, targets,
    dropout generator), their mean gradient, clipped if grad_clip, then one AdamW update.
    Returns the mean loss, the gradients and their norm.  Under MPI, sync (GradientSync)
    makes the mean over every rank's micro-batches, and the loss too."""
    k = sync.total if sync else len(micro_batches)  # the step's micro-batches, all ranks together
    loss, grads = 0.0, None
    for m, (xb, yb, rng) in enumerate(micro_batches):
        model.rng = rng
        loss += model(xb, yb)[1] / k
        micro_grads = model.backward()
        if sync:
            sync.add(m, micro_grads)  # into one flat buffer, no communication
        elif grads is None:  # a copy when more come: FastModel's next backward() reuses its arrays
            grads = micro_grads if k == 1 else {name: g.copy() for name, g in micro_grads.items()}
        else:
            for name, g in micro_grads.items():
                grads[name] += g
    if sync:  # one Allreduce: the mean over all ranks' micro-batches, the same on each
        grads, loss = sync.reduce(), float(sync.comm.allreduce_host([loss])[0])
    elif k > 1:
        for g in grads.values():
            g *= 1.0 / k  # the mean over micro-batches = one big batch
    if grad_clip:
        clip_grad_norm(grads, grad_clip)
    norm = optimizer.step(grads)
    return loss, grads, norm


def estimate_loss(model, train_data, val_data, s, step, comm=None):
    """The book's estimate: mean loss of eval_iters random batches per split, dropout off.
    Under MPI each rank runs its share of the batches; the mean is one process's."""
    B, T = s["batch_size"], s["context_length"]
    model.eval()
    losses = {}
    for stream, (name, data) in enumerate((("train", train_data), ("valid", val_data))):
        rng = np.random.default_rng([s["seed"], 2 + stream, step])
        batches = [get_batch(data, B, T, rng) for _ in range(s["eval_iters"])]
        values = np.zeros(len(batches))  # (eval_iters,) under MPI each rank fills its share
        for i in comm.share(len(batches)) if comm else range(len(batches)):
            values[i] = model(*batches[i])[1]
        losses[name] = float(np.mean(comm.allreduce_host(values) if comm else values))
    if s["eval_full"]:
        losses["valid_full"] = full_loss(model, val_data, T, B, comm)
    model.train()
    return losses


def main(argv=None):
    comm = None
    try:
        comm = from_environment()  # None unless mpiexec started us (docs/distributed.md)
        with abort_on_error(comm):  # a crash on one rank ends every rank
            args = comm.parse(parse_args, argv) if comm else parse_args(argv)
            # A blown-up run is reported once, by the loop, naming the step and parameter;
            # numpy's overflow warnings along the way would only add lines without that.
            with np.errstate(all="ignore"), quiet_unless_first(comm):
                return train(args, comm)
    except (UserError, BackendError) as e:
        if comm is not None:
            return comm.report(e)  # printed once for all ranks (or, mid-run, the job is ended)
        if getattr(e, "speaks", True):
            print(f"error: {e}", file=sys.stderr)
        return 2


def train(args, comm=None):
    """The run; comm, under mpiexec, makes this process one of comm.size ranks of it."""
    world, first_rank = (comm.size, comm.rank == 0) if comm else (1, True)
    if comm:
        comm.use_device(args.backend)  # one GPU per rank
    xp = get_backend(args.backend)
    print(describe_backend(xp), flush=True)

    # ---- settings: flags, else the resumed run's, else the book's ---------------------------
    saved_tensors, saved_meta = load_state(args.resume) if args.resume else (None, {})
    if args.resume:
        check_resumable(saved_tensors, saved_meta, args.resume)  # before any work
    s = resolve_settings(args, saved_meta.get("run", {}))
    if args.resume and args.grad_accum_steps is None:  # a checkpoint counts the micro-batches of all ranks
        s["grad_accum_steps"] = accum_per_rank(s["grad_accum_steps"], world)
    check_settings(s)
    check_training_memory({**s, "max_token_value": saved_meta.get("h_params", {}).get("max_token_value", 1)},
                          s["dtype"], s["batch_size"], s["grad_accum_steps"], args.backend)  # a first bound
    if args.resume and s["max_iters"] <= saved_meta["step"]:
        raise UserError(f"checkpoint {args.resume} is at step {saved_meta['step']}, so --max-iters must be "
                        f"more than {saved_meta['step']} to continue it (got {s['max_iters']})")
    out = args.out if args.out is not None else args.resume or DEFAULT_OUT
    outputs = RunOutputs(out, resume=args.resume, overwrite=args.overwrite, inputs=[s["data"], args.resume])
    if not first_rank:  # rank 0 alone writes files
        outputs = NoOutputs()
    outputs.check()  # before any work: never replace what this run did not write

    # ---- data: read, tokenize with cl100k_base, split 90/10 ---------------------------------
    text = read_text(s["data"]) if s["data"] else default_corpus()
    ids = tokenize(text, get_tokenizer())
    vocab = np.unique(ids) if s["compact_vocab"] else None  # (V,) the ids that occur, sorted
    if vocab is not None:
        ids = np.searchsorted(vocab, ids)  # dense ids 0 .. V-1
    data_sha = hashlib.sha256(ids.tobytes()).hexdigest()
    if args.resume and saved_meta["run"].get("data_sha256") != data_sha:
        raise UserError(f"the data differs from the data {args.resume} was trained on; "
                        "resume with the same --data")
    train_data, val_data = split(ids)
    check_splits(train_data, val_data, s["context_length"])
    print(f"Total: {len(ids):,} tokens ({len(train_data):,} train, {len(val_data):,} validation)")

    # ---- model and optimizer ----------------------------------------------------------------
    h_params = {key: s[key] for key in BOOK_H_PARAMS}
    h_params["max_token_value"] = len(vocab) if vocab is not None else int(ids.max()) + 1
    if args.resume:
        h_params["max_token_value"] = saved_meta["h_params"]["max_token_value"]
    check_training_memory(h_params, s["dtype"], s["batch_size"], s["grad_accum_steps"],
                          args.backend)  # before allocating any of it
    model, optimizer = make_model_and_optimizer(h_params, args.backend, s, args.reference, world)
    start = 0
    if args.resume:
        load_params(model, saved_tensors)
        restore_optimizer(optimizer, saved_tensors, saved_meta, args.resume)
        start = saved_meta["step"]
        print(f"Resuming {args.resume} at step {start}")
    print(f"Model: {model.num_params():,} parameters, vocabulary {h_params['max_token_value']:,}, "
          f"{s['dtype']}")
    run = {**s, "data_sha256": data_sha, "grad_accum_steps": world * s["grad_accum_steps"]}  # as one process's
    if comm:  # every rank has set up the same run, or all of them stop here
        comm.check_same({**s, "data": None, "data_sha256": data_sha, "parameters": model.num_params(),
                         "start": start, "backend": args.backend, "reference": args.reference,
                         "exact_reduce": args.exact_reduce,
                         "weights": fingerprint(to_host(p) for p in model.params.values())})
        print(f"Data parallel: {world} ranks, each {s['grad_accum_steps']} micro-batch"
              f"{'es' if s['grad_accum_steps'] > 1 else ''} a step"
              f"{', gradients added in rank order' if args.exact_reduce else ''}")
    sync = GradientSync(comm, model.params, s["grad_accum_steps"], args.exact_reduce) if comm else None
    B, T, seed = s["batch_size"], s["context_length"], s["seed"]

    # A checkpoint (200 MB in the book's config) is written on a thread of its own while the
    # loop evaluates: that only reads the weights, so the save need only be done before the
    # next step changes them.
    writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
    writing = []  # the save in flight, if any

    def save(step, wait=False):
        if not first_rank:  # rank 0 writes the checkpoint: the same on every rank
            return
        finish_saving()  # one at a time: both write to out
        outputs.check_present(step)  # the folder removed meanwhile: stop, do not recreate it
        writing.append(writer.submit(save_checkpoint, out, *state_contents(model, optimizer, step, run, vocab)))
        if wait:
            finish_saving()

    def finish_saving():
        try:
            while writing:
                writing.pop().result()  # a failed save raises its error here
        except OSError as e:  # a full disk, a folder removed meanwhile: save_checkpoint left out as it was
            raise UserError(f"cannot write the checkpoint {out} ({e.strerror or e}); "
                            "the file there, if any, is the last good one") from e

    # ---- logging: the book's lines, a progress bar on a terminal, metrics JSONL, wandb ------
    wandb_run = start_wandb(args.wandb, h_params, s) if args.wandb and first_rank else None  # may fail: before any file
    bar = None
    interrupted = Interrupts().start()  # Ctrl-C, SIGTERM: finish the step, save, stop
    t0 = time.perf_counter()
    try:
        outputs.claim()  # the lock on out (or one line if another run holds it), then the metrics file
        bar = progress_bar(start, s["max_iters"], enabled=not args.no_progress)
        say = bar.write if bar is not None else print
        for step in range(start, s["max_iters"]):
            if step % s["eval_interval"] == 0 or step == s["max_iters"] - 1:
                losses = estimate_loss(model, train_data, val_data, s, step, comm)
                line = (f"Step: {step}, Training Loss: {losses['train']:.3f}, "
                        f"Validation Loss: {losses['valid']:.3f}")
                if "valid_full" in losses:
                    line += f", Full Validation Loss: {losses['valid_full']:.3f}"
                say(line)
                record = {"step": step, "lr": optimizer.lr, "time_s": round(time.perf_counter() - t0, 3),
                          **{f"{k}_loss": v for k, v in losses.items()}}
                outputs.log(record)
                if wandb_run is not None:
                    wandb_run.log({f"{k}_loss": v for k, v in losses.items()}, step=step)

            optimizer.lr = learning_rate(step, s["learning_rate"], s["lr_schedule"], s["warmup_iters"],
                                         s["max_iters"], s["min_lr"])
            # Under MPI this rank runs its k of the step's world x k micro-batches, numbered as one
            # process with --grad-accum-steps world x k numbers them (nanograd/fast/mpi.py).
            micro_batches = [(*get_batch(train_data, B, T, np.random.default_rng([seed, 0, step, micro])),
                              make_rng(xp, seed, 1, step, micro))
                             for micro in (sync.micro_steps() if sync else range(s["grad_accum_steps"]))]
            finish_saving()  # before the step changes what it writes
            loss, grads, norm = train_step(model, optimizer, micro_batches, s["grad_clip"], sync)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the update is lost: nothing saves it
                bad = next((n for n, g in grads.items() if not bool(xp.isfinite(g).all())), None)
                what = f"the gradient of {bad}" if bad else f"the loss ({loss})"
                kept = f"the last good checkpoint {out} is kept" if os.path.exists(out) else "nothing was saved"
                print(f"error: at step {step} {what} is not finite; stopping ({kept}). "
                      "Try a lower --learning-rate or --grad-clip 1.0.", file=sys.stderr)
                return 3
            if bar is not None:
                bar.update(1)
                tokens = (step + 1 - start) * B * T * s["grad_accum_steps"] * world
                bar.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens / (time.perf_counter() - t0):,.0f}",
                                refresh=False)

            done = step + 1
            stop = comm.agree_on_signals(interrupted) if comm else interrupted  # all ranks stop alike
            if stop:
                save(done, wait=True)
                if bar is not None:
                    bar.close()  # first: closing later would redraw it below the message
                print(f"Interrupted{stop.by()} after step {done}; checkpoint saved to {out}. "
                      f"Resume with: python train.py --resume {out}")
                return stop.exit_code()
            if s["save_interval"] and done % s["save_interval"] == 0 and done < s["max_iters"]:
                save(done)
        save(s["max_iters"], wait=True)
    finally:
        writer.shutdown(wait=True)  # a save in flight completes, whatever stopped the loop
        interrupted.stop()
        outputs.release()
        if bar is not None:
            bar.close()
        if wandb_run is not None:
            wandb_run.finish()

    seconds = time.perf_counter() - t0
    steps = max(s["max_iters"] - start, 1)
    print(f"Training complete in {seconds:.1f} s ({1000 * seconds / steps:.0f} ms/step, "
          f"{steps * B * T * s['grad_accum_steps'] * world / seconds:,.0f} tokens/s). Model saved to {out}")
    return 0


def progress_bar(start, total, enabled):
    """A tqdm bar when stdout is a terminal (and tqdm is installed), else None."""
    if not (enabled and sys.stdout.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if shutil.get_terminal_size((0, 0)).columns > 0:
        return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    # a terminal that reports no size (0 x 0) would hide the bar: assume 80 x 24
    return tqdm(total=total, initial=start, unit="step", ncols=80, nrows=24)


def start_wandb(project, h_params, settings):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb "
                        "(set WANDB_MODE=offline to log without an account)") from None
    return wandb.init(project=project, config={**settings, **h_params})


if __name__ == "__main__":
    run_command(main)
