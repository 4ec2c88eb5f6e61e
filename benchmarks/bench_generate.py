"""Generation speed: the key/value cache against re-running the whole window, and the book's
PyTorch generate, on the book config (untrained weights: speed does not depend on them).

    python benchmarks/bench_generate.py [--out benchmarks/results/generate.md]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_cpu import BOOK, VOCAB, machine  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch
    from nanograd.backend import to_host
    from transformer import Model, book_torch

    model = Model({**BOOK, "max_token_value": VOCAB}).eval()
    reference = book_torch.Model({**BOOK, "max_token_value": VOCAB}).eval()
    book_torch.load_numpy_params(reference, {k: to_host(v) for k, v in model.params.items()})
    prompt = np.arange(10)[None] * 7  # (1, 10)
    lines = [f"Machine: {machine()}", f"Date: {time.strftime('%Y-%m-%d')}", "",
             "| new tokens (prompt 10, context 128) | NumPy + KV cache tok/s | NumPy, no cache tok/s "
             "| PyTorch book generate tok/s | cache speed-up |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for new in (100, 300):
        rates = {}
        runs = {
            "cache": lambda: model.generate(prompt, new, temperature=1.0, rng=np.random.default_rng(0)),
            "nocache": lambda: model.generate(prompt, new, temperature=1.0, rng=np.random.default_rng(0),
                                              kv_cache=False),
            "torch": lambda: reference.generate(torch.from_numpy(prompt), new),
        }
        for name, run in runs.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            rates[name] = new / np.median(times)
        row = (f"| {new} | {rates['cache']:,.0f} | {rates['nocache']:,.0f} | {rates['torch']:,.0f} "
               f"| {rates['cache'] / rates['nocache']:.1f}x |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", "Past the 128-token window the book's absolute positions shift every step, so the cache "
              "is rebuilt from the window each step there (as the uncached loop does); the speed-up is "
              "largest while the text fits the window."]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
