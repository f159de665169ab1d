"""The plain-PyTorch definition of every chunkinfer op.

Tests compare the kernels against these evaluated in float64; when the compiled extension cannot
be loaded, ops.py registers these under the same op names so model code behaves the same.
Computation runs in at least fp32 (float64 inputs stay float64); results take the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _gate_up(x: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if up is not None:
        return x, up
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def silu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = _gate_up(x, up)
    ct = _compute_dtype(x)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    gate, up = _gate_up(x, up)
    ct = _compute_dtype(x)
    return (F.gelu(gate.to(ct), approximate=approximate) * up.to(ct)).to(x.dtype)


def _normalise(v: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, dtype: torch.dtype) -> torch.Tensor:
    """v in the compute dtype; mirrors HF's rounding: Llama rounds the normalised value to the
    input dtype before the weight multiply, Gemma multiplies by (1 + w) in fp32 and rounds once."""
    inv = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (v * inv * (1.0 + weight.to(v.dtype))).to(dtype)
    return ((v * inv).to(dtype).to(v.dtype) * weight.to(v.dtype)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    return _normalise(x.to(_compute_dtype(x)), weight, eps, gemma, x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form: returns (normalised, new residual); the op writes them into x and residual."""
    new_residual = (residual.to(_compute_dtype(x)) + x.to(_compute_dtype(x))).to(x.dtype)
    return rms_norm(new_residual, weight, eps, gemma), new_residual
