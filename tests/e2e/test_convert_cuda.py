"""bf16 on CUDA: converted error vs an fp64 run of the same weights <= 1.5x stock's own bf16 error."""
from __future__ import annotations

import copy

import pytest
import torch

import chunkinfer
from chunkinfer.loop.attention_backend import _math_with_lse, attention_with_lse
from tests.tiny_models import left_padded_batch, make_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_out_and_natural_log_lse(dtype, causal):
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, causal=causal, scale=0.125)
    ref_out, ref_lse = _math_with_lse(q.double(), k.double(), v.double(), causal, 0.125)
    assert lse.shape == ref_lse.shape
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert (lse.double() - ref_lse).abs().max() < tol
    assert (out.double() - ref_out).abs().max() < tol


def _err(x, ref, mask):
    return ((x.double() - ref)[mask.bool()].abs().max() / ref[mask.bool()].abs().max()).item()


MIXTURE_OF_EXPERTS = ("gpt_oss", "qwen3_moe")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3", "gpt_oss", "qwen3_moe", "glm4"])
@torch.no_grad()
def test_bf16_error_within_stock_error(arch):
    ref_model = make_model(arch, layers=4, dtype=torch.float64, device="cuda")
    stock = copy.deepcopy(ref_model).to(torch.bfloat16)
    if arch in MIXTURE_OF_EXPERTS:  # transformers' default experts kernel (grouped_mm) has no float64
        ref_model.set_experts_implementation("eager")
    ids, mask = left_padded_batch(2, 3000, [0, 123])
    ids, mask = ids.cuda(), mask.cuda()
    ref = ref_model(ids, attention_mask=mask).logits
    stock_err = _err(stock(ids, attention_mask=mask).logits, ref, mask)
    chunkinfer.convert(stock, chunk_size=1024)  # does not divide 3000
    ours = stock(ids, attention_mask=mask, use_cache=True)
    ours_err = _err(ours.logits, ref, mask)
    assert ours_err <= 1.5 * stock_err + 1e-6, (ours_err, stock_err)

    # decode steps on the cache, against the fp64 model continuing its own cache
    ref_out = ref_model(ids, attention_mask=mask, use_cache=True)
    nxt = ref_out.logits[:, -1:].argmax(-1)
    ref_cache, cache = ref_out.past_key_values, ours.past_key_values
    for _ in range(4):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        r = ref_model(nxt, attention_mask=mask, past_key_values=ref_cache)
        o = stock(nxt, attention_mask=mask, past_key_values=cache)
        scale = r.logits.abs().max()
        assert ((o.logits.double() - r.logits).abs().max() / scale).item() <= max(1.5 * stock_err, 1e-2)
        nxt = r.logits[:, -1:].argmax(-1)
