"""train.py's settings: the book's h_params, the run's other settings, their flags and checks.

Each setting is a flag; a value given now wins, then (with --resume) the
resumed run's, then the default here.
"""
from .errors import CheckpointError, OneLineParser, UserError
from .state import check_resumable, load_state
from .validate import check_finite_settings, check_seed, check_training_memory

# The rest of the run's settings and their defaults.
RUN_DEFAULTS = {
    "dtype": "float32", "data": None, "save_interval": None,  # None: every eval_interval
    "lr_schedule": "constant", "warmup_iters": 0, "min_lr": 0.0,
    "grad_clip": 0.0, "grad_accum_steps": 1, "eval_full": False, "compact_vocab": False,
}
ARCHITECTURE = ("d_model", "num_blocks", "num_heads", "context_length", "dropout")


def parse_args(argv, book_h_params):
    parser = OneLineParser(prog="train.py", description="Train the book's Transformer, every gradient computed by hand.")
    for key, value in book_h_params.items():  # default None: "not given", so --resume can tell
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
    add_watch_flags(parser)
    return parser.parse_args(argv)


def resolve_settings(args, saved, book_h_params):
    """Flags given now win, then the resumed run's settings, then the defaults."""
    settings = {}
    for key, default in {**book_h_params, **RUN_DEFAULTS, **KEEP_DEFAULTS}.items():
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
    if s["data"] == "":
        raise UserError("--data is empty; give a UTF-8 text file, or leave out --data for the built-in corpus")
    check_seed(s["seed"])
    check_finite_settings(s)


def run_settings(args, book_h_params, world=1):
    """The run's settings (checked), and with --resume the checkpoint's tensors and metadata.

    world: the number of MPI ranks; a checkpoint counts the micro-batches of all of them."""
    saved_tensors, saved_meta = load_state(args.resume) if args.resume else (None, {})
    if args.resume:
        check_resumable(saved_tensors, saved_meta, args.resume)  # before any work
    s = resolve_settings(args, saved_meta.get("run", {}), book_h_params)
    if args.resume and args.grad_accum_steps is None:
        s["grad_accum_steps"] = accum_per_rank(s["grad_accum_steps"], world)
    check_settings(s)
    check_keep(args, s)
    check_training_memory({**s, "max_token_value": saved_meta.get("h_params", {}).get("max_token_value")},
                          s["dtype"], s["batch_size"], s["grad_accum_steps"], args.backend)  # a first bound
    if args.resume:
        check_continues(args, s, saved_meta, world)
    return s, saved_tensors, saved_meta


def accum_per_rank(total, size):
    """The micro-batches per rank of a resumed run whose step had `total` of them in all."""
    if total % size:
        raise UserError(f"the resumed run adds {total} micro-batch{'es' if total > 1 else ''} a step, which "
                        f"{size} ranks cannot share evenly; resume it with a number of processes that divides "
                        f"{total} to keep its batch, or pass --grad-accum-steps k to add {size} x k a step "
                        "instead (a larger or smaller batch than the run it continues)")
    return total // size


def check_continues(args, s, saved_meta, world):
    """UserError unless the resumed run has steps left to take; a note when its batch changes."""
    step, path = saved_meta["step"], args.resume
    if s["max_iters"] <= step and args.max_iters is None:  # the run finished: --max-iters is its own
        raise UserError(f"checkpoint {path} is at step {step}, where its run ended (--max-iters "
                        f"{s['max_iters']}); to train it further give a larger --max-iters, e.g. "
                        f"python train.py --resume {path} --max-iters {2 * step}")
    if s["max_iters"] <= step:
        raise UserError(f"checkpoint {path} is at step {step}, so --max-iters must be "
                        f"more than {step} to continue it (got {s['max_iters']})")
    saved = saved_meta["run"].get("grad_accum_steps", 1)
    if world * s["grad_accum_steps"] != saved:  # only with --grad-accum-steps given: accum_per_rank keeps it
        print(f"Note: {path} was trained on {saved} micro-batch{'es' if saved > 1 else ''} a step; this run "
              f"adds {world * s['grad_accum_steps']} ({world} process{'es' if world > 1 else ''} x "
              f"--grad-accum-steps {s['grad_accum_steps']}), so its batch differs from the run it continues")


# ---- watching a run, and which checkpoint it keeps (issue 22) -------------------------------
# keep is saved with the run, so a resumed --keep best run goes on keeping its best;
# --sample-interval only changes what is printed, so it is not saved.
KEEP_DEFAULTS = {"keep": "last"}


def add_watch_flags(parser):
    parser.add_argument("--keep", choices=["last", "best"], default=None,
                        help="which checkpoint --out holds: the last step's (default, saved every "
                             "--save-interval and at the end), or the best: saved at each evaluation whose "
                             "validation loss is the lowest so far, like nanoGPT's always_save_checkpoint=False")
    parser.add_argument("--sample-interval", type=int, default=None, metavar="N",
                        help="print a short sample of the model's text every N steps and at the end "
                             "(default: every other evaluation; 0: never)")


def check_keep(args, s):
    """UserError for a --keep that cannot work with the rest of the settings."""
    if s["keep"] == "best" and args.save_interval is not None:
        raise UserError("--keep best saves at the evaluations that improve the validation loss; "
                        "leave out --save-interval (it sets when --keep last saves)")


def sample_interval(args, s):
    """Steps between the samples train.py prints: --sample-interval, else every other evaluation."""
    if args.sample_interval is None:
        return 2 * s["eval_interval"]
    if args.sample_interval < 0:
        raise UserError(f"--sample-interval must be 0 (off) or more, got {args.sample_interval}.")
    return args.sample_interval
