"""Real prose for the real-model tests: the paragraphs of data/long_text.txt, tokenised to any length."""
from __future__ import annotations

import random
from pathlib import Path

import torch

TEXT = Path(__file__).parent / "data" / "long_text.txt"


def paragraphs() -> list[str]:
    return [p for p in TEXT.read_text().split("\n\n") if p.strip()]


def document(tok, n_tokens: int) -> torch.Tensor:
    """n_tokens of real prose: the paragraphs of the data file, in a few seeded orders, back to back."""
    paras, rng, text, ids = paragraphs(), random.Random(0), "", []
    while len(ids) < n_tokens:
        order = paras[:]
        rng.shuffle(order)
        text += "\n\n".join(order) + "\n\n"
        ids = tok(text)["input_ids"]
    return torch.tensor([ids[:n_tokens]])
