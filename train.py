"""Train the book's Transformer (ch.19 train.py), every gradient computed by hand.

    python train.py                                  # built-in corpus, the book's settings
    python train.py --data my.txt --backend cupy     # your text, on an NVIDIA GPU
    python train.py --resume model/model.ckpt        # continue an interrupted run
    python train.py --reference                      # the plain Model and AdamW (slower, same numbers)
    mpiexec -n 2 python train.py                     # 2 processes, one training (docs/distributed.md)

Reads top to bottom like the book's: settings, data, model, optimizer, the
loop (evaluate, batch, forward, backward, step), save.  By default the model
and optimizer are the fast twins (transformer/fast_model.py, nanograd/fast/);
--reference trains with transformer/model.py's Model and nanograd/adamw.py's
AdamW, the code to read.  The run's machinery lives in modules named for it:
transformer/settings.py (flags), outputs.py (files, locks, signals),
saving.py (the checkpoint thread), progress.py (what it prints), and
nanograd/fast/mpi.py (data parallelism).
"""
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while the imports load: just stop (run_command restores it)

import hashlib
import math
import os
import sys

import numpy as np

from nanograd import AdamW
from nanograd.backend import BackendError, get_backend, make_rng
from nanograd.clip import clip_grad_norm
from nanograd.fast import FastAdamW
from nanograd.fast.mpi import NoOutputs, abort_on_error, from_environment, quiet_unless_first, start_data_parallel
from nanograd.fast.memory import keep_freed_memory
from nanograd.fast.threads import use_own_threads
from transformer import Model
from transformer.data import check_splits, default_corpus, get_batch, read_text, split, tokenize
from transformer.errors import UserError, run_command
from transformer.evaluation import full_loss, logged_before, mean_loss
from transformer.fast_model import FastModel
from transformer.outputs import DEFAULT_OUT, Interrupts, RunOutputs
from transformer.progress import RunLog, TrainingSample, describe_backend, import_wandb, start_wandb
from transformer.saving import CheckpointSaver, continued_checkpoint
from transformer.schedule import learning_rate
from transformer.settings import adamw_settings, parse_args, run_settings, sample_interval
from transformer.state import load_params, restore_optimizer, state_contents
from transformer.tokenizer import training_tokenizer
from transformer.validate import check_training_memory

# The book's h_params (ch.19), each with a flag of the same name (transformer/settings.py).
BOOK_H_PARAMS = {
    "d_model": 80, "num_blocks": 6, "num_heads": 4,
    "batch_size": 2, "context_length": 128, "max_iters": 500, "learning_rate": 1e-3,
    "dropout": 0.1, "eval_interval": 50, "eval_iters": 10, "seed": 1337,
}


def train(args, comm=None):
    """The run; comm, under mpiexec, makes this process one of comm.size ranks of it."""
    world, first_rank = (comm.size, comm.rank == 0) if comm else (1, True)
    if comm:
        comm.use_device(args.backend)  # one GPU per rank
    xp = get_backend(args.backend)
    print(describe_backend(xp), flush=True)

    # ---- settings: flags, else the resumed run's, else the book's ---------------------------
    s, saved_tensors, saved_meta = run_settings(args, BOOK_H_PARAMS, world)
    sample_every = sample_interval(args, s)  # steps between samples of text, 0: none
    wandb = import_wandb() if args.wandb and first_rank else None  # a missing package: before any work
    out = args.out if args.out is not None else args.resume or DEFAULT_OUT
    outputs = RunOutputs(out, resume=args.resume, overwrite=args.overwrite, inputs=[s["data"], args.resume])
    outputs = outputs if first_rank else NoOutputs()  # rank 0 alone writes files
    outputs.check()  # before any work: never replace what this run did not write

    # ---- data: read, tokenize (cl100k_base, or --tokenizer char), split 90/10 ----------------
    text = read_text(s["data"]) if s["data"] else default_corpus()
    tokenizer = training_tokenizer(s["tokenizer"], text, saved_meta.get("run"))
    ids = tokenize(text, tokenizer)
    vocab = np.unique(ids) if s["compact_vocab"] else None  # (V,) the ids that occur, sorted
    if vocab is not None:
        ids = np.searchsorted(vocab, ids)  # dense ids 0 .. V-1
    data_sha = hashlib.sha256(ids.tobytes()).hexdigest()
    if args.resume and saved_meta["run"].get("data_sha256") != data_sha:
        raise UserError(f"the data differs from the data {args.resume} was trained on; resume with the same --data")
    train_data, val_data = split(ids)
    check_splits(train_data, val_data, s["context_length"])
    print(f"Total: {len(ids):,} tokens ({len(train_data):,} train, {len(val_data):,} validation)")
    sample = TrainingSample(ids, vocab, s["seed"], tokenizer) if sample_every and first_rank else None

    # ---- model and optimizer ----------------------------------------------------------------
    h_params = {key: s[key] for key in BOOK_H_PARAMS}
    h_params["max_token_value"] = len(vocab) if vocab is not None else int(ids.max()) + 1
    if args.resume:
        h_params["max_token_value"] = saved_meta["h_params"]["max_token_value"]
    check_training_memory(h_params, s["dtype"], s["batch_size"], s["grad_accum_steps"], args.backend)  # before allocating
    model, optimizer = make_model_and_optimizer(h_params, args.backend, s, args.reference, world)
    start = 0
    if args.resume:
        load_params(model, saved_tensors)
        restore_optimizer(optimizer, saved_tensors, saved_meta, args.resume)
        optimizer.betas, optimizer.weight_decay = (0.9, s["beta2"]), s["weight_decay"]  # as given now, if given
        start = saved_meta["step"]
        print(f"Resuming {args.resume} at step {start}")
    print(f"Model: {model.num_params():,} parameters, vocabulary {h_params['max_token_value']:,}, {s['dtype']}")
    run = {**s, "data_sha256": data_sha, "grad_accum_steps": world * s["grad_accum_steps"]}  # as one process's
    if s["tokenizer"] == "char":
        run["chars"] = tokenizer.chars  # the vocabulary, for inference.py
    sync = start_data_parallel(comm, model, s, args, start, data_sha) if comm else None
    B, T, seed, k = s["batch_size"], s["context_length"], s["seed"], s["grad_accum_steps"]

    def micro_batches(step):  # drawn one at a time: memory does not grow with k
        for m, micro in enumerate(sync.micro_steps() if sync else range(k)):
            if m:
                check_signals()  # a long accumulation stops between micro-batches, the step dropped
            yield (*get_batch(train_data, B, T, np.random.default_rng([seed, 0, step, micro])),
                   make_rng(xp, seed, 1, step, micro))

    def check_signals():  # Ctrl-C, SIGTERM, SIGHUP: every rank stops at the same point, with nothing half-done
        stop = comm.agree_on_signals(interrupted) if comm else interrupted
        if stop:
            raise Stopped(stop)

    # ---- the loop: evaluate, batch, forward, backward, step, save ---------------------------
    saver = CheckpointSaver(out, outputs, first_rank, s["keep"], s["save_interval"],
                            continued_checkpoint(out, args.resume, start, saved_meta.get("run", {})))
    wandb_run = start_wandb(wandb, args.wandb, h_params, s) if wandb else None  # before any file
    log = None
    interrupted = Interrupts().start()  # signals are recorded, and acted on by check_signals
    done = start  # steps completed

    def snapshot():  # what a save writes: taken now, before the next step changes it
        return state_contents(model, optimizer, done, {**run, "time_s": round(log.training_seconds(), 3)}, vocab)
    try:
        outputs.claim()  # the lock on out (or one line if another run holds it), then the metrics file
        log = RunLog(outputs, start, s["max_iters"], B * T * k * world, not args.no_progress, wandb_run,
                     saved_meta.get("run", {}).get("time_s", 0.0))
        logged = logged_before(outputs, start, comm)  # the resumed run evaluated its last step already
        for step in range(start, s["max_iters"]):
            if (step % s["eval_interval"] == 0 or step == s["max_iters"] - 1) and not (step == start and logged):
                losses = estimate_loss(model, train_data, val_data, s, step, check_signals, comm)
                log.evaluation(step, losses, optimizer.lr)
                saver.evaluated(step, losses["valid"], snapshot)  # --keep best: saves the best so far
            if sample and step and step % sample_every == 0:
                log.sample(step, sample.text(model))
            optimizer.lr = learning_rate(step, s["learning_rate"], s["lr_schedule"], s["warmup_iters"],
                                         s["max_iters"], s["min_lr"])
            saver.finish()  # the save in flight, before the step changes what it writes
            loss, grads, norm = train_step(model, optimizer, micro_batches(step), world * k, s["grad_clip"], sync)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the update is lost: nothing saves it
                return report_blowup(step, loss, grads, xp, out)
            done = step + 1
            log.step(step, loss)
            check_signals()
            saver.stepped(done, s["max_iters"], snapshot)  # --keep last: every save_interval
        if sample:
            log.sample(done, sample.text(model))
        saver.ended(done, snapshot)
    except Stopped as stop:  # between steps, or mid-evaluation or mid-accumulation: the last whole step
        saver.ended(done, snapshot)
        log.close()
        print(f"Interrupted{stop.signals.by()} after step {done}; {saver.kept()}."
              + (f" Resume with: python train.py --resume {out}" if saver.best or s["keep"] == "last" else ""))
        return stop.signals.exit_code()
    finally:
        saver.close()
        interrupted.stop()
        outputs.release()
        if log is not None:
            log.close()
        elif wandb_run is not None:
            wandb_run.finish()
    log.finished(s["max_iters"] - start, saver.kept(final=True))
    return 0


class Stopped(Exception):
    """A signal asked the run to stop; signals says which (outputs.Interrupts)."""

    def __init__(self, signals):
        super().__init__()
        self.signals = signals


def make_model_and_optimizer(h_params, backend, s, reference, ranks=1):
    """The model and AdamW: the fast twins (transformer/fast_model.py, nanograd/fast/), or with
    reference the plain ones, which run as any NumPy program does (BLAS on every core)."""
    if reference:
        model = Model(h_params, backend=backend, dtype=s["dtype"], seed=s["seed"])
        return model, AdamW(model.params, **adamw_settings(s, model.params))
    use_own_threads()  # the fast path splits its big kernels over the cores itself: BLAS on one
    keep_freed_memory()  # each step's arrays on the pages the last step's used (9 ms a step at the char config)
    model = FastModel(h_params, backend=backend, dtype=s["dtype"], seed=s["seed"])
    optimizer = FastAdamW(model.params, **adamw_settings(s, model.params))
    if s["grad_accum_steps"] == 1 and not s["grad_clip"] and ranks == 1:  # AdamW need not see every gradient first:
        model.head_ready = optimizer.start  # it begins on the output layer mid-backward
    return model, optimizer


def train_step(model, optimizer, micro_batches, k, grad_clip, sync=None):
    """One step of the book's loop: forward and backward of each of the k micro-batches (inputs,
    targets, dropout generator), their mean gradient, clipped if grad_clip, then one AdamW update.
    Returns the mean loss, the gradients and their norm.  Under MPI, sync (GradientSync) makes
    the mean over every rank's micro-batches (k counts them all), and the loss too."""
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


def estimate_loss(model, train_data, val_data, s, step, check_signals=lambda: None, comm=None):
    """The book's estimate: mean loss of eval_iters random batches per split, dropout off.
    The batches are drawn one at a time; under MPI the ranks take turns (mean_loss)."""
    B, T = s["batch_size"], s["context_length"]
    model.eval()
    losses = {}
    for stream, (name, data) in enumerate((("train", train_data), ("valid", val_data))):
        rng = np.random.default_rng([s["seed"], 2 + stream, step])
        batches = (get_batch(data, B, T, rng) for _ in range(s["eval_iters"]))
        losses[name] = mean_loss(model, batches, s["eval_iters"], check_signals, comm)
    if s["eval_full"]:
        losses["valid_full"] = full_loss(model, val_data, T, B, comm, check_signals)
    model.train()
    return losses


def report_blowup(step, loss, grads, xp, out):
    """The error line for a step whose loss or gradient is not finite; exit status 3."""
    bad = next((n for n, g in grads.items() if not bool(xp.isfinite(g).all())), None)
    what = f"the gradient of {bad}" if bad else f"the loss ({loss})"
    kept = f"the last good checkpoint {out} is kept" if os.path.exists(out) else "nothing was saved"
    print(f"error: at step {step} {what} is not finite; stopping ({kept}). "
          "Try a lower --learning-rate or --grad-clip 1.0.", file=sys.stderr)
    return 3


def main(argv=None):
    comm = None
    try:
        comm = from_environment()  # None unless mpiexec started us (docs/distributed.md)
        with abort_on_error(comm):  # a crash on one rank ends every rank
            args = comm.parse(lambda a: parse_args(a, BOOK_H_PARAMS), argv) if comm else parse_args(argv, BOOK_H_PARAMS)
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


if __name__ == "__main__":
    run_command(main)
