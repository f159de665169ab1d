"""The fused attention kernels the layer loop calls, chosen by device and dtype; the one place to swap kernels.

Every function here takes q, k, v as [B, H, M, D] / [B, H, N, D] with equal head counts (GQA folding is
the caller's job) and returns ``out`` [B, H, M, D] in q's dtype and, where asked, the log-sum-exp of the
scaled scores [B, H, M] in fp32, natural log. ``causal`` is top-left aligned (query i sees keys <= i).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _math_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Plain math in at least fp32; the exact reference the kernels are tested against.
    ct = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if causal:
        m, n = scores.shape[-2:]
        scores.masked_fill_(torch.ones(m, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.to(ct))
    return out.to(q.dtype), lse  # fp64 inputs keep an fp64 lse


def _cpu_flash_with_lse(q, k, v, causal, scale):
    # Returns (out, logsumexp[B, H, M]); natural log (tested against _math_with_lse).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse.float()


def _cuda_cudnn_with_lse(q, k, v, causal, scale):
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, scale=)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    out, lse = res[0], res[1]
    if lse.dim() == 4:  # cuDNN's stats come back as [B, H, M, 1]
        lse = lse.squeeze(-1)
    return out, lse.float()


def _cuda_efficient_with_lse(q, k, v, causal, scale):
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, scale=); lse is padded along M to a
    # multiple of 32, hence the slice.
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[-2]].float()


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp, on the fastest exact kernel for the device and dtype."""
    return select_backend(q)(q, k, v, causal, scale)


def select_backend(q: torch.Tensor):
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            return _cuda_cudnn_with_lse
        if q.dtype == torch.float32:
            return _cuda_efficient_with_lse
        return _math_with_lse
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _cpu_flash_with_lse
    return _math_with_lse


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention of q [B, Hq, M, D] over k, v [B, Hkv, N, D] without repeating K, V (decode)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
