"""verify.reference_step_logits: the fp32 recomputation the million-token runs are checked with must
agree with the stock model's own next-token logits."""
from __future__ import annotations

import copy

import pytest
import torch

import chunkinfer
from chunkinfer.tools.verify import reference_step_logits
from tests.tiny_models import make_model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3", "mistral"])
@torch.no_grad()
def test_reference_step_matches_stock(arch):
    stock = make_model(arch, layers=3, dtype=torch.float32)
    ours = chunkinfer.convert(copy.deepcopy(stock), chunk_size=64)
    g = torch.Generator().manual_seed(torch.randint(0, 1 << 30, ()).item())
    ids = torch.randint(3, 256, (1, 150), generator=g)
    out = ours(ids, use_cache=True)
    nxt = torch.randint(3, 256, (1, 1), generator=g)
    ref = copy.deepcopy(stock).double()(torch.cat([ids, nxt], 1)).logits[0, -1]
    got = reference_step_logits(ours, out.past_key_values, nxt, kv_block=40, dtype=torch.float64)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # the cache holds fp32 K, V
    assert out.past_key_values.get_seq_length() == 150  # read, not written


@torch.no_grad()
def test_reference_step_rejects_a_batch():
    model = chunkinfer.convert(make_model("llama", layers=1))
    out = model(torch.randint(3, 256, (1, 8)), use_cache=True)
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        reference_step_logits(model, out.past_key_values, torch.ones(2, 1, dtype=torch.long))
