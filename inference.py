"""Continue a prompt with a trained model (the book's ch.20 inference.py).

    python inference.py --prompt "The module"
    python inference.py --ckpt model/model.ckpt --temperature 0.8 --top-k 50 --seed 7
"""
import signal
import sys
import time

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while the imports load: stop quietly (run_command resets it)

import numpy as np

from nanograd.backend import BackendError, get_backend
from transformer.errors import OneLineParser, UserError, run_command
from transformer.outputs import DEFAULT_OUT, Interrupts, check_default_folder
from transformer.state import build_model, load_state
from transformer.tokenizer import decode, encode_prompt, get_tokenizer
from transformer.validate import check_generation_memory, check_seed


def parse_args(argv):
    parser = OneLineParser(prog="inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=DEFAULT_OUT, help="checkpoint written by train.py")
    parser.add_argument("--prompt", default="The ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.5, help="0 picks the most likely token")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the most likely tokens whose probabilities add up to p")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 makes tokens already in the text less likely (CTRL's rule)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute every position each step")
    parser.add_argument("--list-params", action="store_true",
                        help="after the parameter count, list every parameter's name and shape")
    return parser.parse_args(argv)


def check_args(args):
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}.")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be 0 or more, got {args.temperature}.")
    if args.top_k is not None and args.top_k <= 0:
        raise UserError(f"--top-k must be a positive integer, got {args.top_k}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1], got {args.top_p}.")
    if not args.repetition_penalty > 0:
        raise UserError(f"--repetition-penalty must be greater than 0, got {args.repetition_penalty}.")
    check_seed(args.seed)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        get_backend(args.backend)
        check_default_folder(args.ckpt)  # model is a file: a run saved with --out model
        tensors, meta = load_state(args.ckpt)
        model = build_model(tensors, meta, backend=args.backend).eval()
        vocab = tensors.get("vocab")
        tokenizer = get_tokenizer()
        ids = encode_prompt(args.prompt, tokenizer, vocab, meta["h_params"]["max_token_value"])
        check_generation_memory(meta["h_params"], model.dtype, len(ids), args.max_new_tokens, args.backend)
    except (UserError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    interrupted = Interrupts().start()  # Ctrl-C: stop sampling, print the text so far
    try:
        out = model.generate(ids[None], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             rng=np.random.default_rng(args.seed), kv_cache=not args.no_kv_cache,
                             stop=lambda: bool(interrupted))[0]
    finally:
        interrupted.stop()
    seconds = time.perf_counter() - t0
    generated = len(out) - len(ids)
    if vocab is not None:
        out = vocab[out]  # back to cl100k_base ids
    print("---------------")
    print(decode(tokenizer, out))
    print("---------------")
    print(f"Generated {generated} tokens in {seconds:.2f} s ({generated / max(seconds, 1e-9):,.1f} tokens/s)"
          + (f"; interrupted{interrupted.by()} before the {args.max_new_tokens} asked for" if interrupted else ""))
    print(f"Model parameters: {model.num_params():,}")
    if args.list_params:
        for name, p in model.params.items():
            print(f"  {name}: {tuple(p.shape)}")
    return interrupted.exit_code() if interrupted else 0


if __name__ == "__main__":
    run_command(main)
