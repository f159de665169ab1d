"""Converted vs stock logits (fp32, CPU) and greedy generate() for every supported architecture."""
from __future__ import annotations

import pytest
import torch

import chunkinfer
from tests.tiny_models import left_padded_batch, make_model, max_rel_err


@pytest.mark.parametrize("chunk", [32, 50])  # divides S / does not
def test_logits_match_stock_with_left_padding(arch, chunk):
    model = make_model(arch)
    ids, mask = left_padded_batch(2, 160, [0, 37])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        chunkinfer.convert(model, chunk_size=chunk)
        out = model(ids, attention_mask=mask).logits
    assert out.shape == ref.shape
    assert max_rel_err(out, ref, mask) < 1e-4


def test_greedy_generate_matches_stock(arch):
    model = make_model(arch)
    ids, mask = left_padded_batch(2, 90, [0, 21])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    chunkinfer.convert(model, chunk_size=40)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch_long", ["llama", "gemma3"])
def test_long_sequence_2048(arch_long):
    model = make_model(arch_long, layers=2)
    ids, mask = left_padded_batch(1, 2048, [0])
    with torch.no_grad():
        ref = model(ids).logits
        chunkinfer.convert(model, chunk_size=300)
        out = model(ids).logits
    assert max_rel_err(out, ref) < 1e-4
