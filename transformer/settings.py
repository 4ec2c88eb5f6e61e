"""train.py's settings: the book's h_params, the run's other settings, their flags and checks.

Each setting is a flag, and a key of the same name (with _ for -) in a --config
TOML file.  A flag given now wins, then the config file, then (with --resume)
the resumed run's settings, then the defaults here.  Every checkpoint records
the resolved settings in meta["run"]; `python -m transformer.settings CKPT`
prints them back as a config file that reproduces the run.
"""
import argparse
import difflib
import sys

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.9, 3.10: the same parser, as a package (pyproject.toml)
    import tomli as tomllib

from .errors import CheckpointError, OneLineParser, UserError, run_command
from .state import check_resumable, load_state
from .validate import RUN_RULES, check_finite_settings, check_seed, check_training_memory, read_file, short

# The rest of the run's settings and their defaults.
RUN_DEFAULTS = {
    "dtype": "float32", "data": None, "save_interval": None,  # None: every eval_interval
    "lr_schedule": "constant", "warmup_iters": 0, "min_lr": 0.0,
    "grad_clip": 0.0, "grad_accum_steps": 1, "eval_full": False, "compact_vocab": False,
}
# The tokenizer and AdamW's settings (issue 24); the defaults are the book's (torch's AdamW).
TOKENIZER_ADAMW_DEFAULTS = {"tokenizer": "cl100k_base", "beta2": 0.999, "weight_decay": 0.01,
                            "weight_decay_on": "all"}
ARCHITECTURE = ("d_model", "num_blocks", "num_heads", "context_length", "dropout")
CONFIG_ONLY = ("out",)  # config keys that are no setting of the run (not recorded, not checked on resume)


def parse_args(argv, book_h_params):
    parser = OneLineParser(prog="train.py", description="Train the book's Transformer, every gradient computed by hand.")
    for key, value in book_h_params.items():  # default None: "not given", so --resume can tell
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                            help=f"(default: {value}, the book's)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="numpy (the CPU) or cupy (an NVIDIA GPU)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="the weights' precision (default: float32)")
    parser.add_argument("--data", default=None, help="UTF-8 text file (default: the built-in corpus)")
    parser.add_argument("--out", default=None, help="checkpoint path (default: model/model.ckpt, or --resume's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's checkpoint and metrics at --out (refused otherwise)")
    parser.add_argument("--resume", default=None, metavar="CKPT",
                        help="continue the run saved in CKPT (default: a new run)")
    parser.add_argument("--save-interval", type=int, default=None,
                        help="save every N steps (default: at every evaluation; 0: only at the end)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None,
                        help="cosine: after the warm-up, down to --min-lr at --max-iters (default: constant)")
    parser.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up steps (default: 0)")
    parser.add_argument("--min-lr", type=float, default=None, help="cosine's final rate (default: 0)")
    parser.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm (default: 0, off)")
    parser.add_argument("--grad-accum-steps", type=int, default=None, help="micro-batches per step (default: 1)")
    parser.add_argument("--eval-full", action=argparse.BooleanOptionalAction, default=None,
                        help="also compute the exact loss over the whole validation split (default: off)")
    parser.add_argument("--compact-vocab", action=argparse.BooleanOptionalAction, default=None,
                        help="renumber the corpus's token ids densely (a much smaller output layer; default: off)")
    parser.add_argument("--wandb", nargs="?", const="LLMZhang_lesson_2", default=None, metavar="PROJECT",
                        help="log to Weights & Biases (WANDB_MODE=offline works without an account; default: off)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--reference", action="store_true",
                        help="train with the plain Model and AdamW (the code to read; slower, same numbers)")
    parser.add_argument("--exact-reduce", action="store_true",
                        help="under mpiexec: add the ranks' gradients in rank order, so the run equals one "
                             "process's bit for bit (slower)")
    add_watch_flags(parser)
    add_config_flags(parser)
    args = parser.parse_args(argv)
    return apply_config(args, {**book_h_params, **RUN_DEFAULTS, **KEEP_DEFAULTS, **TOKENIZER_ADAMW_DEFAULTS})


def resolve_settings(args, saved, book_h_params):
    """Flags given now win (and the config file's settings, which apply_config put among them),
    then the resumed run's settings, then the defaults."""
    settings = {}
    for key, default in {**book_h_params, **RUN_DEFAULTS, **KEEP_DEFAULTS, **TOKENIZER_ADAMW_DEFAULTS}.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else saved.get(key, default)
        kind = {bool: bool, int: int, float: (int, float), str: str}.get(type(default))
        if kind and not isinstance(settings[key], kind) or kind is int and isinstance(settings[key], bool):
            raise CheckpointError(f"checkpoint {args.resume} stores a malformed {key} ({settings[key]!r}); "
                                  "it cannot be resumed, but inference.py can still use it")
    if args.resume:
        for key in ARCHITECTURE + ("compact_vocab", "dtype", "tokenizer"):
            before = saved.get(key, TOKENIZER_ADAMW_DEFAULTS.get(key))  # a checkpoint older than --tokenizer: cl100k
            if getattr(args, key) is not None and getattr(args, key) != before:
                given = f"{key} in {args.config}" if key in getattr(args, "from_config", ()) else \
                    f"--{key.replace('_', '-')}"
                raise UserError(f"{given} differs from the checkpoint's ({before!r}); a resumed run keeps its model")
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
    if s["compact_vocab"] and s["tokenizer"] == "char":
        raise UserError("--compact-vocab renumbers cl100k_base's ids; --tokenizer char's are already dense, "
                        "drop one of the two")
    if not 0 <= s["beta2"] < 1:
        raise UserError(f"--beta2 must lie in [0, 1), got {s['beta2']}.")
    if not s["weight_decay"] >= 0:
        raise UserError(f"--weight-decay must be 0 or more, got {s['weight_decay']}.")
    check_seed(s["seed"])
    check_finite_settings(s, ("learning_rate", "min_lr", "grad_clip", "dropout", "beta2", "weight_decay"))


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


# ---- a config file, the tokenizer and AdamW's settings (issues 22.4, 24.1) ---------------------

def add_config_flags(parser):
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="settings from a TOML file, one key per flag (batch_size = 12); flags given "
                             "with it win (default: none)")
    parser.add_argument("--tokenizer", choices=["cl100k_base", "char"], default=None,
                        help="cl100k_base (the book's) or char: the sorted characters of the text, as "
                             "nanoGPT's shakespeare_char (default: cl100k_base)")
    parser.add_argument("--beta2", type=float, default=None, help="AdamW's second-moment decay (default: 0.999)")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW's decoupled weight decay "
                        "(default: 0.01)")
    parser.add_argument("--weight-decay-on", choices=["all", "matrices"], default=None,
                        help="decay every parameter (the book's), or only those of 2 or more dimensions, as "
                             "nanoGPT (default: all)")


def adamw_settings(s, params):
    """AdamW's keyword arguments from the settings s: the rate, betas (0.9, beta2), the weight
    decay, and with weight_decay_on "matrices" the parameters it spares (nanoGPT's second group:
    those of fewer than 2 dimensions, the biases and LayerNorms' gains and shifts)."""
    no_decay = [name for name, p in params.items() if p.ndim < 2] if s["weight_decay_on"] == "matrices" else []
    return {"lr": s["learning_rate"], "betas": (0.9, s["beta2"]), "weight_decay": s["weight_decay"],
            "no_decay": no_decay}


def apply_config(args, defaults):
    """args with each setting not given as a flag taken from args.config's file, if any;
    args.from_config names the keys the file gave."""
    args.from_config = set()
    if args.config is None:
        return args
    for key, value in read_config(args.config, defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            args.from_config.add(key)
    return args


def read_config(path, defaults):
    """{key: value} of the TOML config file at path, every key a setting of defaults (or out)
    and every value of its type and in its range; UserError naming the first that is not."""
    try:
        raw = read_file(path, "config file", per_byte=64)  # a regular file, its size checked first
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass the path of a TOML file") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass the path of a TOML file") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path} ({e.strerror}); check its permissions") from None
    try:
        config = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not valid UTF-8 (bad byte at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    known = [*defaults, *CONFIG_ONLY]
    for key, value in config.items():
        if key not in known:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"config file {path} has an unknown setting {short(key)}; {hint}the settings are "
                            "train.py's flags with _ for - (see train.py --help)")
        test, kind = RUN_RULES.get(key, (lambda v: isinstance(v, str) and 0 < len(v) < 4096, "a path"))
        if not test(value):
            raise UserError(f"config file {path}: {key} must be {kind}, got {short(value)}")
        if isinstance(defaults.get(key), float):
            config[key] = float(value)  # learning_rate = 1 means 1.0, as --learning-rate 1 does
    return config


NOT_SETTINGS = ("data_sha256", "converted_from", "chars", "max_token_value",  # facts of a run, not settings
                "time_s", "best_valid_loss")


def config_text(run):
    """A TOML config of the settings a checkpoint recorded (its meta["run"]): train.py --config
    with it repeats the run.  Keys that are facts about the data, not settings, are left out."""
    lines = []
    for key, value in run.items():
        if key in RUN_RULES and key not in NOT_SETTINGS and value is not None:
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value):
    """value as a TOML literal: a bool, an int, a float (repr is TOML's syntax) or a basic string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if any(0xD800 <= ord(c) < 0xE000 for c in value):  # a path's bytes that are not UTF-8 (surrogateescape)
        raise UserError(f"{short(value)} holds bytes that are not UTF-8, which a TOML file cannot hold")
    escaped = (c if c not in '"\\' and 0x20 <= ord(c) != 0x7F else f"\\u{ord(c):04x}" for c in value)
    return '"' + "".join(escaped) + '"'


def main(argv=None):
    parser = OneLineParser(prog="python -m transformer.settings",
                           description="Print the settings a checkpoint was trained with as a TOML config "
                                       "for train.py --config.")
    parser.add_argument("ckpt", help="checkpoint written by train.py")
    args = parser.parse_args(argv)
    try:
        _, meta = load_state(args.ckpt)
        if not meta["run"] or "converted_from" in meta["run"]:
            raise UserError(f"checkpoint {args.ckpt} records no training settings; only a checkpoint that "
                            "train.py wrote has them")
        text = config_text(meta["run"])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# The settings a checkpoint recorded at step {meta['step']}: python train.py --config FILE.toml")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_command(main)
