"""The book's ch.19 train.py in PyTorch, on the same data as our train.py: the baseline
for the whole-run comparison.

    time python benchmarks/book_train_torch.py                 # built-in corpus, book settings
    time python train.py                                       # ours, same data and settings

It follows the book's loop line for line (torch.randint batches, estimate_loss
in eval mode, AdamW, save {'model_state_dict', 'h_params'}); the only change
is where the text comes from (our built-in corpus, or --data) and that the
tokenizer is our packaged copy of cl100k_base (identical ids, no download).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformer.book_torch import Model  # noqa: E402
from transformer.data import default_corpus, read_text  # noqa: E402
from transformer.tokenizer import get_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", default=None)
parser.add_argument("--max-iters", type=int, default=500)
parser.add_argument("--out", default=os.path.join("model", "book_torch.ckpt"))
args = parser.parse_args()

h_params = {
    "d_model": 80, "batch_size": 2, "context_length": 128, "num_blocks": 6, "num_heads": 4,
    "dropout": 0.1, "max_iters": args.max_iters, "learning_rate": 1e-3, "eval_interval": 50,
    "eval_iters": 10, "device": "cpu", "TORCH_SEED": 1337,
}
torch.manual_seed(h_params["TORCH_SEED"])
t0 = time.perf_counter()

text = read_text(args.data) if args.data else default_corpus()
tokenized_text = get_tokenizer().encode_ordinary(text)
max_token_value = max(tokenized_text) + 1
h_params["max_token_value"] = max_token_value
tokenized_text = torch.tensor(tokenized_text, dtype=torch.long, device=h_params["device"])
print(f"Total: {len(tokenized_text):,} tokens")

train_size = int(len(tokenized_text) * 0.9)
train_data = tokenized_text[:train_size]
val_data = tokenized_text[train_size:]

model = Model(h_params).to(h_params["device"])


def get_batch(split):
    data = train_data if split == "train" else val_data
    idxs = torch.randint(low=0, high=len(data) - h_params["context_length"], size=(h_params["batch_size"],))
    x = torch.stack([data[idx:idx + h_params["context_length"]] for idx in idxs])
    y = torch.stack([data[idx + 1:idx + h_params["context_length"] + 1] for idx in idxs])
    return x.to(h_params["device"]), y.to(h_params["device"])


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "valid"]:
        losses = torch.zeros(h_params["eval_iters"])
        for k in range(h_params["eval_iters"]):
            x_batch, y_batch = get_batch(split)
            logits, loss = model(x_batch, y_batch)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


optimizer = torch.optim.AdamW(model.parameters(), lr=h_params["learning_rate"])
for step in range(h_params["max_iters"]):
    if step % h_params["eval_interval"] == 0 or step == h_params["max_iters"] - 1:
        losses = estimate_loss()
        print(f'Step: {step}, Training Loss: {losses["train"]:.3f}, Validation Loss: {losses["valid"]:.3f}')
    xb, yb = get_batch("train")
    logits, loss = model(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
torch.save({"model_state_dict": model.state_dict(), "h_params": h_params}, args.out)
print(f"Training complete in {time.perf_counter() - t0:.1f} s. Model saved to {args.out}")
