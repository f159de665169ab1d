"""The attention pieces on CPU: backend LSE, the merge, GQA folding, padded and windowed blocks."""
from __future__ import annotations

import pytest
import torch

from chunkinfer.loop.attention import block_attention, fold_gqa, unfold_gqa
from chunkinfer.loop.attention_backend import _math_with_lse, attention_with_lse
from chunkinfer.ops.reference import merge_attn_states


def _dense_reference(q, k, v, q_start, key_starts, window, scale, sinks=None):
    """fp64 attention with an explicit mask, GQA by repetition (what transformers does); ``sinks``: a
    logit per head as one more softmax column, dropped after (gpt-oss's eager path)."""
    b, hq, c, d = q.shape
    g = hq // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    qi = torch.arange(q_start, q_start + c)[:, None]
    kj = torch.arange(k.shape[2])[None]
    allowed = (kj <= qi)
    if window is not None:
        allowed &= kj > qi - window
    allowed = allowed[None].repeat(b, 1, 1)
    for i, s in enumerate(key_starts or [0] * b):
        allowed[i, :, :s] = False
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double()[None, :, None, None].expand(*scores.shape[:3], 1)], -1)
        return torch.softmax(scores, -1)[..., :-1] @ v
    return torch.softmax(scores, -1).nan_to_num() @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_backend_lse_is_natural_log(dtype, causal):
    q, k, v = (torch.randn(2, 3, 29, 16, dtype=dtype) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, causal=causal, scale=0.3)
    ref_out, ref_lse = _math_with_lse(q.double(), k.double(), v.double(), causal, 0.3)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (lse.double() - ref_lse).abs().max() < tol
    assert (out.double() - ref_out).abs().max() < tol


def test_merge_of_two_key_halves_equals_whole():
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    whole, _ = _math_with_lse(q, k, v, False, 0.5)
    a = _math_with_lse(q, k[:, :, :3], v[:, :, :3], False, 0.5)
    b = _math_with_lse(q, k[:, :, 3:], v[:, :, 3:], False, 0.5)
    assert (merge_attn_states(a[0], a[1], b[0], b[1])[0] - whole).abs().max() < 1e-12


def test_fold_roundtrip_maps_heads_to_their_kv_group():
    q = torch.randn(2, 8, 5, 4)
    folded = fold_gqa(q, 2)
    assert folded.shape == (2, 2, 20, 4)
    assert torch.equal(folded[:, 1, 5:10], q[:, 5])  # head 5 = group 1, member 1
    assert torch.equal(unfold_gqa(folded, 8), q)


@pytest.mark.parametrize("q_start, c", [(0, 9), (13, 9), (40, 1), (40, 3)])
@pytest.mark.parametrize("key_starts", [None, [0, 17]])
@pytest.mark.parametrize("window", [None, 11])
def test_block_attention_matches_dense_mask(q_start, c, key_starts, window):
    torch.manual_seed(0)
    b, hq, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, hq, c, d, dtype=torch.float64)
    k = torch.randn(b, hkv, q_start + c, d, dtype=torch.float64)
    v = torch.randn_like(k)
    out = block_attention(q, k, v, q_start, key_starts, window, 0.4)
    ref = _dense_reference(q, k, v, q_start, key_starts, window, 0.4)
    rows = torch.ones(b, c, dtype=torch.bool)
    for i, s in enumerate(key_starts or []):  # padding queries: don't care
        rows[i, : max(0, s - q_start)] = False
    diff = (out - ref).abs().amax(dim=(1, 3))
    assert diff[rows].max() < 1e-10


@pytest.mark.parametrize("q_start, c", [(0, 9), (13, 9), (40, 1), (40, 3), (30, 20)])
@pytest.mark.parametrize("key_starts", [None, [0, 17]])
@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinks_and_key_offset_match_dense(q_start, c, key_starts, window, dtype):
    """Sinks join each softmax denominator (prefix, block, band and decode paths); k, v may start at the
    window's first key (a ring's band) instead of position 0."""
    torch.manual_seed(1)
    b, hq, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, hq, c, d, dtype=dtype)
    k = torch.randn(b, hkv, q_start + c, d, dtype=dtype)
    v = torch.randn_like(k)
    sinks = torch.randn(hq, dtype=dtype) * 2
    lo = 0 if window is None else max(0, q_start - window + 1)
    out = block_attention(q, k[:, :, lo:], v[:, :, lo:], q_start, key_starts, window, 0.4, key_offset=lo, sinks=sinks)
    ref = _dense_reference(q, k, v, q_start, key_starts, window, 0.4, sinks)
    rows = torch.ones(b, c, dtype=torch.bool)
    for i, s in enumerate(key_starts or []):
        rows[i, : max(0, s - q_start)] = False
    diff = (out.double() - ref).abs().amax(dim=(1, 3))
    assert diff[rows].max() < (1e-10 if dtype == torch.float64 else 1e-5)
