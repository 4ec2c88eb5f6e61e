"""One gate for everything that comes from outside: files read from disk and sizes from flags.

    read_file(path, what)          the bytes of a regular file, its size checked before reading
    check_h_params(h)              the model's settings: types, ranges, consistency
    check_state(tensors, meta)     a whole checkpoint of ours: every meta field and tensor
    model_bytes / training_bytes / generation_bytes
                                   memory estimates, computed from the settings alone
    check_memory(need, what, fix)  refuse an estimate above what this machine has
    check_device_memory(...)       the same against the GPU's free memory (--backend cupy)

Every refusal is a UserError (a CheckpointError for checkpoints): one sentence, which the
scripts print as `error: ...` and exit 2.  Nothing here allocates more than the numbers it checks.
"""
import math
import os
import stat

import numpy as np

from .errors import CheckpointError, UserError
from .tokenizer import ORDINARY_IDS

MEMORY_LIMIT_ENV = "NANOGRAD_MEMORY_LIMIT"  # bytes; caps the budget below the machine's (tests, shared hosts)
TOKENIZER_IDS = 100277  # cl100k_base: ranks 0..100255 and special tokens up to 100276
FLOATS = ("float32", "float64")
MAX_SEED = 2**64  # seeds are NumPy SeedSequence entropy: 0 <= seed < 2**64
JSON_BYTES_PER_BYTE = 40  # Python objects parsed from one byte of JSON, at worst ("{}," is a 64-byte dict)
MAX_NDIM = 32  # a checkpoint's tensors: NumPy allows 64; no tensor of a model has more than a few


# ---- memory ------------------------------------------------------------------------------

def memory_budget():
    """Bytes this process may plan to use: the memory available now, capped by $NANOGRAD_MEMORY_LIMIT."""
    budget = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).splitlines():
                if line.startswith(b"MemAvailable:"):
                    budget = int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    if budget is None:
        try:
            budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            budget = 2**63
    limit = os.environ.get(MEMORY_LIMIT_ENV, "")
    if limit.isdigit():
        budget = min(budget, int(limit))
    return budget


def size_text(nbytes):
    """12800000000 -> '12.8 GB' (decimal units, as disks and `free -h --si` count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB", "ZB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} YB"


def check_memory(need, what, fix, error=UserError):
    """`error` unless `need` bytes fit in the budget: '<what> need(s) about N of memory but ...; <fix>'."""
    budget = memory_budget()
    if need > budget:
        raise error(f"{what} about {size_text(need)} of memory but this machine has "
                    f"{size_text(budget)} available; {fix}")


def device_memory_budget():
    """Bytes CuPy's current GPU can still give: its free memory plus what CuPy's pool holds
    unused ($NANOGRAD_MEMORY_LIMIT caps the host's budget only).  Only called on --backend
    cupy, once get_backend("cupy") has found the device."""
    from nanograd import backend
    free, _total = backend.cupy.cuda.runtime.memGetInfo()
    return free + backend.cupy.get_default_memory_pool().free_bytes()


def check_device_memory(need, what, fix, error=UserError):
    """check_memory against the GPU: '<what> about N of GPU memory but the GPU has M free; <fix>'."""
    budget = device_memory_budget()
    if need > budget:
        raise error(f"{what} about {size_text(need)} of GPU memory but the GPU has {size_text(budget)} free; {fix}")


def parameter_count(h):
    """Number of model parameters, from h_params alone (what parameter_shapes would list, summed)."""
    C, NB, V = h["d_model"], h["num_blocks"], h["max_token_value"]
    per_block = 12 * C * C + 10 * C  # ln1, ln2 (4C); Wq, Wk, Wv (3C^2); proj (C^2 + C); ffn (8C^2 + 5C)
    return V * C + NB * per_block + 2 * C + V * C + V  # embedding, blocks, final LayerNorm, output layer


def parameter_tensor_count(h):
    """Number of tensors parameter_shapes(h) lists, without listing them."""
    return 5 + h["num_blocks"] * (10 + 3 * h["num_heads"])  # per block: 4 LayerNorm, 3 per head, 2 proj, 4 ffn


def model_bytes(h, itemsize):
    """Host bytes Model(h) takes while it is built: float64 initial values, the model's own
    arrays, the per-block stacks of the heads' weights, the position table with its temporaries,
    and the Python objects around them."""
    C, NB, T = h["d_model"], h["num_blocks"], h["context_length"]
    P = parameter_count(h)
    python_objects = 1024 * parameter_tensor_count(h) + 2**16  # array headers, names, dicts, per-block tuples
    return P * (8 + itemsize) + NB * 3 * C * C * 8 + T * C * (24 + itemsize) + python_objects


def training_bytes(h, itemsize, batch_size, accum_steps=1):
    """Bytes of a training run: the model, its gradients, AdamW's two moments, (with
    micro-batches) the summed gradients, and one batch's forward caches and work buffers."""
    C, NB, NH, T, V = h["d_model"], h["num_blocks"], h["num_heads"], h["context_length"], h["max_token_value"]
    B, P = batch_size, parameter_count(h)
    per_block = B * T * 24 * C + 2 * B * NH * T * T  # LayerNorm, q/k/v, ffn activations; scores and weights
    state = P * (3 + (accum_steps > 1))  # gradients, m, v (+ their running sum)
    head = 4 * B * T * V + B * T * C * 4  # logits, probabilities, their gradient, a work buffer; final LayerNorm
    return model_bytes(h, itemsize) + (state + NB * per_block + head) * itemsize + B * T * 8 * 4


def generation_bytes(h, itemsize, prompt_tokens, new_tokens):
    """Bytes of generating new_tokens after a prompt: the key/value cache, one window's
    forward (its attention weights kept per block) and float64 logits, and the ids."""
    C, NB, NH, T, V = h["d_model"], h["num_blocks"], h["num_heads"], h["context_length"], h["max_token_value"]
    W = min(T, prompt_tokens + new_tokens)  # the longest window the model ever sees
    kv = 2 * NB * T * C * itemsize
    window = NB * (W * 24 * C + 2 * NH * W * W) * itemsize + W * V * (itemsize + 8)
    return kv + window + V * 8 * 4 + (prompt_tokens + new_tokens) * 8 * 2


PIXEL_BYTES = 32  # matplotlib's Agg holds about this much per pixel while it draws and saves a figure


def inspect_bytes(h, itemsize, tokens, pixels):
    """Bytes of drawing attention maps: the model, one forward of `tokens` positions with the
    caches it keeps, every head's (T, T) map on the host, and the largest image of `pixels`."""
    C, NB, NH, V = h["d_model"], h["num_blocks"], h["num_heads"], h["max_token_value"]
    T = tokens
    forward = (NB * (T * 24 * C + 2 * NH * T * T) + 2 * T * V) * itemsize  # blocks' caches; logits, a temporary
    return model_bytes(h, itemsize) + forward + NB * NH * T * T * 8 + PIXEL_BYTES * int(pixels)


def check_inspect_memory(h, dtype, tokens, pixels):
    """UserError, with the estimate, unless drawing the maps of `tokens` positions fits in memory."""
    check_memory(inspect_bytes(h, np.dtype(dtype).itemsize, tokens, pixels),
                 f"drawing the attention maps of {tokens} tokens (num_blocks {h['num_blocks']}, num_heads "
                 f"{h['num_heads']}, images of up to {pixels / 1e6:.1f} million pixels) needs",
                 "shorten --prompt or use a machine with more memory")


def check_training_memory(h, dtype, batch_size, accum_steps=1, backend="numpy"):
    """UserError, with the estimate, unless a training run with these settings fits in memory.

    h["max_token_value"] None: the vocabulary is not known yet (the data is still unread), so
    the estimate is a lower bound, made with a vocabulary of one token, and says "at least".
    On CuPy the run lives in the GPU's memory, checked against what the device has free
    (training_bytes also counts the host's float64 copy made while building the model: a
    small overestimate), and the host need only hold the model while it is built."""
    V = h["max_token_value"]
    h = {**h, "max_token_value": V or 1}
    itemsize = np.dtype(dtype).itemsize
    need = training_bytes(h, itemsize, batch_size, accum_steps)
    vocabulary = f"a vocabulary of {V:,} needs" if V is not None else "any vocabulary needs at least"
    what = (f"training with d_model {h['d_model']}, num_blocks {h['num_blocks']}, context_length "
            f"{h['context_length']}, batch_size {batch_size} and {vocabulary}")
    fix = "lower --batch-size, --context-length, --d-model or --num-blocks"
    if backend == "cupy":
        check_memory(model_bytes(h, itemsize), what, fix)
        check_device_memory(need, what, fix)
    else:
        check_memory(need, what, fix)


def check_generation_memory(h, dtype, prompt_tokens, new_tokens, backend="numpy"):
    """UserError, with the estimate, unless generating new_tokens after the prompt fits in memory
    (on CuPy, in the GPU's free memory: the model is already there)."""
    check = check_device_memory if backend == "cupy" else check_memory
    check(generation_bytes(h, np.dtype(dtype).itemsize, prompt_tokens, new_tokens),
          f"generating {new_tokens} tokens with context_length {h['context_length']} needs",
          "lower --max-new-tokens or use a machine with more memory")


# ---- files -------------------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def open_regular(path, what, error=UserError):
    """The file at path opened for reading, `error` if it is a pipe, a device or a directory.
    Opened without blocking (a FIFO would otherwise wait for a writer forever) and checked
    with fstat on the open file.  OSError (missing, no permission) is left to the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise error(f"{what} {path} is {kind}, not a regular file; pass the path of a file")
    return f


def read_file(path, what, error=UserError, per_byte=2):
    """The bytes of the regular file at path (open_regular), `error` if it is too big.

    Read only up to the size it had when opened: /dev/zero and a file that grows are never
    read without end.  per_byte: bytes of memory that handling one byte of the file takes
    (the read itself and what is built from it).
    """
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        check_memory(size * per_byte, f"reading {what} {path} ({size_text(size)}) needs",
                     "pass a smaller file or use a machine with more memory", error)
        return f.read(size)


# ---- settings ----------------------------------------------------------------------------

def is_int(value):
    """An int that is not a bool (JSON true is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """A finite int or float that is not a bool (JSON's NaN and Infinity are not settings)."""
    if is_int(value):
        return abs(value) < 2**1023
    return isinstance(value, (float, np.floating)) and math.isfinite(value)


def _count(value, low, high=math.inf):
    return is_int(value) and low <= value < high


# name -> (test, what it must be): the book's h_params and the run settings train.py saves.
_POSITIVE = (lambda v: _count(v, 1), "a positive integer")
_NON_NEGATIVE = (lambda v: _count(v, 0), "an integer, 0 or more")
_RATE = (lambda v: is_real(v) and v > 0, "a finite number greater than 0")
_NON_NEGATIVE_REAL = (lambda v: is_real(v) and v >= 0, "a finite number, 0 or more")
_DROPOUT = (lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)")
_SEED = (lambda v: _count(v, 0, MAX_SEED), "an integer in [0, 2**64)")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
H_PARAM_RULES = {
    "d_model": _POSITIVE, "num_blocks": _POSITIVE, "num_heads": _POSITIVE, "context_length": _POSITIVE,
    "max_token_value": _POSITIVE, "dropout": _DROPOUT, "batch_size": _POSITIVE, "max_iters": _POSITIVE,
    "eval_interval": _POSITIVE, "eval_iters": _POSITIVE, "learning_rate": _RATE, "seed": _SEED,
}
RUN_RULES = {
    **H_PARAM_RULES,
    "dtype": (lambda v: v in FLOATS, "float32 or float64"),
    "data": (lambda v: v is None or isinstance(v, str) and 0 < len(v) < 4096 and "\0" not in v,
             "null or a file path"),
    "save_interval": _NON_NEGATIVE, "warmup_iters": _NON_NEGATIVE,
    "lr_schedule": (lambda v: v in ("constant", "cosine"), "constant or cosine"),
    "min_lr": _NON_NEGATIVE_REAL, "grad_clip": _NON_NEGATIVE_REAL, "grad_accum_steps": _POSITIVE,
    "eval_full": _BOOL, "compact_vocab": _BOOL,
    "data_sha256": (lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
                    "64 hexadecimal digits"),
    "converted_from": (lambda v: isinstance(v, str), "a path"),
    "keep": (lambda v: v in ("last", "best"), "last or best"),
    "time_s": _NON_NEGATIVE_REAL,  # seconds the run had trained when it saved: its metrics' time_s go on from it
    "best_valid_loss": _NON_NEGATIVE_REAL,  # --keep best: the validation loss of the evaluation saved
}
REQUIRED_H_PARAMS = ("d_model", "num_blocks", "num_heads", "context_length", "max_token_value")


def short(value):
    """repr(value), cut to 40 characters: a crafted value may be a megabyte long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_h_params(h):
    """UserError naming the first of the model's settings that it cannot be built with."""
    if not isinstance(h, dict):
        raise UserError(f"h_params must be a mapping of settings, got {type(h).__name__}.")
    for key in REQUIRED_H_PARAMS:
        if key not in h:
            raise UserError(f"h_params lacks {key!r}; the model cannot be built without it.")
    for key, (test, kind) in H_PARAM_RULES.items():
        if key in h and not test(h[key]):
            if key in REQUIRED_H_PARAMS:  # the wording tests and users already know
                raise UserError(f"{key} must be a positive integer, got {short(h[key])}.")
            raise UserError(f"{key} must be {kind}, got {short(h[key])}.")
    if h["d_model"] % h["num_heads"]:
        raise UserError(f"d_model ({h['d_model']}) must be divisible by num_heads "
                        f"({h['num_heads']}); each head gets d_model // num_heads channels.")


def check_finite_settings(s, keys=("learning_rate", "min_lr", "grad_clip", "dropout")):
    """UserError unless each of these float settings is finite (a checkpoint could not hold the run)."""
    for key in keys:
        if not is_real(s[key]):
            raise UserError(f"--{key.replace('_', '-')} must be a finite number, got {s[key]}.")


def check_seed(seed, flag="--seed"):
    """UserError unless seed can seed NumPy's generators."""
    if not _SEED[0](seed):
        raise UserError(f"{flag} must be an integer in [0, 2**64), got {short(seed)}.")


# ---- checkpoints ---------------------------------------------------------------------------

MOMENT_LABELS = {"adamw.exp_avg.": "AdamW's first moment of", "adamw.exp_avg_sq.": "AdamW's second moment of"}
TOKENIZER = "cl100k_base"


def mask_names(h):
    """The book's causal-mask buffers for h_params: one (T, T) per head per block."""
    return [f"transformer_blocks.{i}.mha.heads.{j}.mask" for i in range(h["num_blocks"]) for j in range(h["num_heads"])]


def _expected_names(meta, tensors, path):
    """parameter name -> shape of meta's h_params, once their count is known to be in the file
    and the model they make is known to fit in memory."""
    from .model import parameter_shapes  # model imports this module
    h = meta["h_params"]
    count = parameter_tensor_count(h)
    have = sum(not name.startswith("adamw.") and not name.endswith(".mask") for name in tensors)
    if count > len(tensors):  # listing them would cost more than the file holds: refuse by count
        raise CheckpointError(f"checkpoint {path} holds {have} parameter tensors but its h_params "
                              f"describe {count}; it does not match its own h_params")
    itemsize = np.dtype(meta["dtype"]).itemsize
    held = sum(t.nbytes for t in tensors.values())
    check_memory(model_bytes(h, itemsize) + held,
                 f"checkpoint {path}'s model (d_model {h['d_model']}, num_blocks {h['num_blocks']}, "
                 f"context_length {h['context_length']}, vocabulary {h['max_token_value']}) needs",
                 "use a machine with more memory, or the file was edited", CheckpointError)
    return parameter_shapes(h)


def _check_array(path, name, array, shape, dtype, finite=True, non_negative=False):
    where = f"checkpoint {path}'s tensor {name}"
    if array.shape != tuple(shape):
        raise CheckpointError(f"{where} has shape {array.shape} but the model needs {tuple(shape)}; "
                              "the file was edited or damaged")
    if array.dtype != dtype:
        raise CheckpointError(f"{where} is {array.dtype} but the checkpoint's dtype is {dtype}; "
                              "the file was edited or damaged")
    if finite and not np.isfinite(array).all():
        raise CheckpointError(f"{where} holds NaN or infinite values; the file was edited or damaged")
    if non_negative and (array < 0).any():
        raise CheckpointError(f"{where} holds negative values (a second moment cannot); "
                              "the file was edited or damaged")


def _check_adamw(path, adamw, step):
    """CheckpointError unless AdamW's saved hyperparameters and step count are usable."""
    rules = {"lr": _RATE, "eps": _RATE, "weight_decay": _NON_NEGATIVE_REAL, "t": _NON_NEGATIVE}
    bad = f"checkpoint {path} has a malformed optimizer entry"
    if not isinstance(adamw, dict):
        raise CheckpointError(f"{bad} (adamw is {type(adamw).__name__}); the file was edited or damaged, "
                              "use another copy")
    for key, (test, kind) in rules.items():
        if not test(adamw.get(key)):
            raise CheckpointError(f"{bad}: adamw.{key} must be {kind}, got {short(adamw.get(key))}")
    betas = adamw.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(is_real(b) and 0 <= b < 1 for b in betas)):
        raise CheckpointError(f"{bad}: adamw.betas must be two numbers in [0, 1), got {short(betas)}")
    if adamw["t"] != step:
        raise CheckpointError(f"{bad}: adamw.t ({adamw['t']}) differs from step ({step}); "
                              "the file was edited or damaged")


def _check_run(path, run, meta, has_vocab):
    """CheckpointError unless the saved run settings are well-typed and agree with h_params."""
    if not isinstance(run, dict):
        raise CheckpointError(f"checkpoint {path} has a malformed run entry ({type(run).__name__}); "
                              "the file was edited or damaged, use another copy")
    for key, (test, kind) in RUN_RULES.items():
        if key in run and not test(run[key]):
            raise CheckpointError(f"checkpoint {path} stores a malformed run.{key} ({short(run[key])}): "
                                  f"it must be {kind}; the file was edited or damaged")
    h = meta["h_params"]
    for key in H_PARAM_RULES:
        if key in run and key in h and run[key] != h[key]:
            raise CheckpointError(f"checkpoint {path} stores run.{key} = {short(run[key])} but "
                                  f"h_params.{key} = {short(h[key])}; the file was edited or damaged")
    if "dtype" in run and run["dtype"] != meta["dtype"]:
        raise CheckpointError(f"checkpoint {path} stores run.dtype = {run['dtype']!r} but its weights "
                              f"are {meta['dtype']}; the file was edited or damaged")
    if "compact_vocab" in run and run["compact_vocab"] != has_vocab:
        raise CheckpointError(f"checkpoint {path} stores run.compact_vocab = {run['compact_vocab']} but "
                              f"{'has' if has_vocab else 'lacks'} a vocab tensor; the file was edited or damaged")


def _check_vocab(path, vocab, size):
    """CheckpointError unless vocab maps the model's ids 0..size-1 to cl100k ids, sorted and distinct."""
    where = f"checkpoint {path}'s vocab"
    if not isinstance(vocab, list) or not all(map(is_int, vocab)):
        raise CheckpointError(f"{where} must be a list of token ids, got {short(vocab)}; "
                              "the file was edited or damaged")
    if len(vocab) != size:
        raise CheckpointError(f"{where} holds {len(vocab)} ids but the model has {size}; "
                              "the file was edited or damaged")
    if not all(0 <= i < ORDINARY_IDS for i in vocab) or any(a >= b for a, b in zip(vocab, vocab[1:])):
        raise CheckpointError(f"{where} must hold distinct ids of text tokens, in [0, {ORDINARY_IDS}), in "
                              "increasing order; the file was edited or damaged")


def _check_masks(path, tensors, h, dtype):
    """CheckpointError unless the causal masks are all there and tril(ones(T, T)), or all absent
    (a checkpoint of the first format holds none)."""
    names = mask_names(h)
    present = [name for name in names if name in tensors]
    if not present:
        return
    if len(present) != len(names):
        missing = next(name for name in names if name not in tensors)
        raise CheckpointError(f"checkpoint {path} lacks the causal mask {missing} but holds others; "
                              "the file was edited or damaged")
    T = h["context_length"]
    for name in names:
        _check_array(path, name, tensors[name], (T, T), dtype)  # its shape first: tril below is no bigger
    tril = np.tril(np.ones((T, T), dtype=dtype))  # (T, T)
    for name in names:
        if not np.array_equal(tensors[name], tril):
            raise CheckpointError(f"checkpoint {path}'s tensor {name} is not the causal mask "
                                  "tril(ones(T, T)); the file was edited or damaged")


def check_state(tensors, meta, path, format_name):
    """CheckpointError unless (tensors, meta) from load_checkpoint is a whole, consistent model
    of ours: every meta field typed and in range, every tensor named, shaped and finite, and
    the model's memory within the budget before anything is built from it."""
    if meta.get("format") != format_name or not isinstance(meta.get("h_params"), dict):
        raise CheckpointError(f"{path} is a checkpoint file but not of a {format_name} model; "
                              "pass a checkpoint written by train.py")
    try:
        check_h_params(meta["h_params"])
    except UserError as e:
        raise CheckpointError(f"checkpoint {path} holds unusable h_params: {e}") from e
    h = meta["h_params"]
    dtype = meta.setdefault("dtype", "float32")
    if dtype not in FLOATS:
        raise CheckpointError(f"checkpoint {path} has dtype {short(dtype)}; it must be float32 or "
                              "float64, the file was edited or damaged")
    step = meta.setdefault("step", 0)
    if not _count(step, 0):
        raise CheckpointError(f"checkpoint {path} has a malformed step ({short(step)}); "
                              "the file was edited or damaged, use another copy")
    adamw = meta.setdefault("adamw", None)
    if adamw is not None:
        _check_adamw(path, adamw, step)
    vocab = meta.setdefault("vocab", None)
    if meta.setdefault("tokenizer", TOKENIZER) != TOKENIZER:
        raise CheckpointError(f"checkpoint {path} was made for the tokenizer {short(meta['tokenizer'])}; "
                              f"this code has only {TOKENIZER}")
    _check_run(path, meta.setdefault("run", {}), meta, vocab is not None)
    if vocab is None and h["max_token_value"] > TOKENIZER_IDS:
        raise CheckpointError(f"checkpoint {path} has max_token_value {h['max_token_value']} but the "
                              f"tokenizer has only {TOKENIZER_IDS} ids; the file was edited or damaged")
    shapes = _expected_names(meta, tensors, path)  # counted first: a crafted num_blocks lists nothing
    moments = tuple(MOMENT_LABELS) if adamw is not None else ()
    expected = {*shapes, *(m + n for m in moments for n in shapes)}
    masks = set(mask_names(h))  # listed only now: num_blocks and num_heads are known to fit the file
    for name in tensors:
        if name not in expected and name not in masks:
            raise CheckpointError(f"checkpoint {path} holds an unexpected tensor {short(name)}; "
                                  "it does not match its own h_params and optimizer entries")
    for name, shape in shapes.items():
        for prefix in ("", *moments):
            stored = tensors.get(prefix + name)
            if stored is None:
                label = MOMENT_LABELS.get(prefix, "parameter")
                raise CheckpointError(f"checkpoint {path} lacks {label} {name} of shape {tuple(shape)}; "
                                      "it does not match its own h_params")
            _check_array(path, prefix + name, stored, shape, np.dtype(dtype),
                         non_negative=prefix == "adamw.exp_avg_sq.")
    _check_masks(path, tensors, h, np.dtype(dtype))
    if vocab is not None:
        _check_vocab(path, vocab, h["max_token_value"])
