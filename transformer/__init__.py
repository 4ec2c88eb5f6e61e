"""The book's Transformer (ch.18) on nanograd, with its data, tokenizer and checkpoints."""
from .model import Model

__all__ = ["Model"]
