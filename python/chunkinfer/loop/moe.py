"""A mixture-of-experts MLP on one block of rows: the model's own router, then each row through its top-k
experts, combined as transformers' experts modules combine them.

The router module is called as is (its top-k and its normalisation of the routing weights are the
family's, so they cannot drift from stock). Each expert's output is weighted in the routing weights'
dtype, rounded to the stream's dtype and added to a zero output in ascending expert order, as stock's
``index_add_`` loop does. Nothing spans more than the block: rows are grouped by expert inside it (one
host read of the counts per block), never a [rows, experts, intermediate] tensor. A step of a few rows
reads only the chosen experts' weights and never waits for the device (a CUDA graph captures it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import LayerBinding, MoeSpec

GATHER_MAX_ROWS = 4  # rows up to which the chosen experts' weights are gathered (decode and few-token steps)


def _project(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, spec: MoeSpec) -> torch.Tensor:
    """x [n, in] by one expert's weight ([out, in], or [in, out] when transposed) (+ its bias)."""
    y = x @ w if spec.transposed else F.linear(x, w)
    return y if bias is None else y + bias


def _expert(experts: nn.Module, spec: MoeSpec, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up = _project(x, experts.gate_up_proj[e], experts.gate_up_proj_bias[e] if spec.bias else None, spec)
    act = experts._apply_gate(gate_up)  # the family's own activation (gpt-oss: clamped, interleaved)
    return _project(act, experts.down_proj[e], experts.down_proj_bias[e] if spec.bias else None, spec)


def _grouped(experts: nn.Module, spec: MoeSpec, x: torch.Tensor, weights: torch.Tensor,
             idx: torch.Tensor) -> torch.Tensor:
    n_experts = experts.gate_up_proj.shape[0]
    k = idx.shape[1]
    order = torch.argsort(idx.reshape(-1), stable=True)  # (row, slot) pairs grouped by expert
    counts = torch.bincount(idx.reshape(-1), minlength=n_experts).tolist()
    out = torch.zeros_like(x)
    pos = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        sel = order[pos:pos + n]
        pos += n
        rows, slot = sel // k, sel % k
        y = _expert(experts, spec, e, x[rows]) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def _batched(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, spec: MoeSpec) -> torch.Tensor:
    """Rows x [m, in], each by its own gathered weight w [m, out, in] (or [m, in, out]) (+ bias [m, out])."""
    y = torch.bmm(x[:, None], w)[:, 0] if spec.transposed else torch.bmm(w, x[:, :, None])[..., 0]
    return y if bias is None else y + bias


def _gathered(experts: nn.Module, spec: MoeSpec, x: torch.Tensor, weights: torch.Tensor,
              idx: torch.Tensor) -> torch.Tensor:
    k = idx.shape[1]
    chosen, order = torch.sort(idx.reshape(-1), stable=True)  # ascending expert, as stock adds them
    rows, slot = order // k, order % k
    xs = x[rows]
    gu_b = experts.gate_up_proj_bias.index_select(0, chosen) if spec.bias else None
    gate_up = _batched(xs, experts.gate_up_proj.index_select(0, chosen), gu_b, spec)
    act = experts._apply_gate(gate_up)
    d_b = experts.down_proj_bias.index_select(0, chosen) if spec.bias else None
    y = _batched(act, experts.down_proj.index_select(0, chosen), d_b, spec) * weights[rows, slot, None]
    return torch.zeros_like(x).index_add_(0, rows, y.to(x.dtype))


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def moe_mlp(lb: LayerBinding, spec: MoeSpec, h: torch.Tensor) -> torch.Tensor:
    """The mixture-of-experts MLP of rows h [B, c, H] (normed); returns [B, c, H]."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    routed = lb.router(x)  # (logits, routing weights [N, k], expert indices [N, k])
    weights, idx = routed[1], routed[2]
    # a step captured in a CUDA graph cannot read the counts on the host: it gathers whatever its rows
    fn = _gathered if x.shape[0] <= GATHER_MAX_ROWS or _capturing(x) else _grouped
    return fn(lb.experts, spec, x, weights, idx).view(shape)
