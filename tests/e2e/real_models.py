"""The real models' GGUF files for the tests: skipped where they are not installed, a failure under CI
(README's install brings them, so a missing one there is a missing install step, not a reason to skip)."""
from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TEXT = Path(__file__).parent / "data" / "long_text.txt"


def require(locate: Callable[[], Path]) -> Path:
    pytest.importorskip("gguf")   # transformers reads GGUF files through it (the test extra)
    try:
        return locate()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"under CI the real models must be installed: {exc}")
        pytest.skip(str(exc))


def document(tok, n_tokens: int) -> torch.Tensor:
    """n_tokens of real prose: the paragraphs of the data file, in a few seeded orders, back to back."""
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if p.strip()]
    rng, text, ids = random.Random(0), "", []
    while len(ids) < n_tokens:
        order = paragraphs[:]
        rng.shuffle(order)
        text += "\n\n".join(order) + "\n\n"
        ids = tok(text)["input_ids"]
    return torch.tensor([ids[:n_tokens]])


def load(gguf: Path):
    """(tokenizer, fp32 model with SDPA attention) from a GGUF file, offline."""
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = T.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    return tok, model
