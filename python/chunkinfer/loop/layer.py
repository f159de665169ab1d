"""One decoder layer's computations on a block of rows, shared by the prefill and the steps: the norms,
q, k, v, rotary with the cache write, o_proj and the MLP. Which norms sit where is the adapter's fact
(``LayerBinding``); this module only applies them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..kv.device_layer import KVBuffers
from ..models.adapters import LayerBinding, ModelBinding
from .moe import moe_mlp
from .rope import Rope, write_interleaved


def takes_gemv(x: torch.Tensor, gemv_rows: int, *weights: torch.Tensor) -> bool:
    """Whether a projection of x goes to the gemv ops: at most ``gemv_rows`` rows that the ops take. The
    prefill and batched steps pass 1 (a batch-1 decode step's row), measured on the H200
    (bench/results/gemv_h200.md, profile_decode_h200.md): q|k|v and act(gate)*up beat cuBLAS alone, o_proj
    and down tie with it alone and shorten the step (no split-K reduce kernels). Exact steps pass
    ops.gemv_rows_per_call: each row then computes as a one-row step does (loop/step.py)."""
    return x.numel() <= gemv_rows * x.shape[-1] and ops.gemv_supports(x, *weights)


def linear(x: torch.Tensor, m, gemv_rows: int = 1) -> torch.Tensor:
    if takes_gemv(x, gemv_rows, m.weight):
        return ops.gemv(x, [m.weight], [m.bias])
    return F.linear(x, m.weight, m.bias)


def gemv_all(x: torch.Tensor, modules, gemv_rows: int, norm: ops.NormPrologue | None = None) -> torch.Tensor | None:
    """The projections of x's rows by every module, side by side, in one launch (of rms_norm(x (+ add))
    with ``norm``); None where the gemv ops do not serve it (more rows, layouts), for F.linear to do."""
    weights = [m.weight for m in modules]
    if not takes_gemv(x, gemv_rows, *weights):
        return None
    return ops.gemv(x, weights, [m.bias for m in modules], norm=norm)


def gate_up_weights(lb: LayerBinding) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The MLP's gate and up weights (halves of a fused gate_up) and whether either has a bias."""
    if len(lb.gate_up) == 1:
        w = lb.gate_up[0].weight
        inter = lb.intermediate
        return w[:inter], w[inter:], lb.gate_up[0].bias is not None
    return (lb.gate_up[0].weight, lb.gate_up[1].weight,
            lb.gate_up[0].bias is not None or lb.gate_up[1].bias is not None)


def to_layer_device(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The residual stream (or a tensor that travels with it) on the next layer's device: the whole
    stream once per device boundary, never per chunk (a model spread over devices)."""
    return None if x is None or x.device == device else x.to(device)


def act_buffer(mb: ModelBinding, like: torch.Tensor, rows: int) -> torch.Tensor:
    """The MLP activation buffer every chunk and layer reuses: rows x the widest intermediate size."""
    return like.new_empty(rows * max(lb.intermediate for lb in mb.layers))


class LayerOps:
    """One layer's pieces, bound to its K, V buffers, the call's rotary tables and the reused MLP buffer."""

    def __init__(self, mb: ModelBinding, lb: LayerBinding, kv: KVBuffers, rope: Rope, act_buf: torch.Tensor | None,
                 gemv_rows: int = 1):
        self.mb, self.lb, self.kv, self.rope, self.act_buf = mb, lb, kv, rope, act_buf
        self.gemv_rows = gemv_rows  # projections of at most this many rows go to the gemv ops
        self.gemma = mb.adapter.gemma_norms
        self.eps = mb.norm_eps

    def norm(self, x: torch.Tensor, module) -> torch.Tensor:
        return ops.rms_norm(x, module.weight, self.eps, gemma=self.gemma)

    def prologue(self, module, add: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> ops.NormPrologue:
        """``module``'s RMSNorm (after adding ``add``) as the prologue of a gemv launch."""
        return ops.NormPrologue(module.weight, self.eps, self.gemma, add=add, residual_out=residual_out)

    def qkv(self, h: torch.Tensor, want_q: bool, norm: ops.NormPrologue | None = None):
        """q, k, v [B, c, heads, D] of rows h; with ``norm``, of rms_norm(h (+ add)) in the gemv's launch
        (which must serve h)."""
        lb = self.lb
        b, c, _ = h.shape
        mods = lb.qkv if want_q or len(lb.qkv) == 1 else lb.qkv[1:]
        qkv = gemv_all(h, mods, self.gemv_rows, norm)  # a decode step: every projection in one launch
        if qkv is None and norm is not None:
            raise ValueError("qkv with a norm prologue needs the gemv ops to take these rows")
        if qkv is None and len(mods) == 1:
            qkv = linear(h, mods[0])
        if qkv is not None:
            nq = lb.n_q * lb.head_dim if mods[0] is lb.qkv[0] else 0
            nk = lb.n_kv * lb.head_dim
            q, k, v = qkv[..., :nq] if want_q else None, qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q = linear(h, lb.qkv[0], self.gemv_rows) if want_q else None
            k, v = linear(h, lb.qkv[1], self.gemv_rows), linear(h, lb.qkv[2], self.gemv_rows)
        k = k.view(b, c, lb.n_kv, lb.head_dim)
        v = v.view(b, c, lb.n_kv, lb.head_dim)
        if lb.k_norm is not None:
            k = self.norm(k, lb.k_norm)
        if want_q:
            q = q.view(b, c, lb.n_q, lb.head_dim)
            if lb.q_norm is not None:
                q = self.norm(q, lb.q_norm)
        return q, k, v

    def rotate_and_write(self, q, k, v, r0: int, r1: int, index: torch.Tensor) -> None:
        """Rotary on q (in place) and k of rows [r0, r1); k, v into the cache at ``index``: one fused op."""
        cos, sin = self.rope.get(self.lb.rope_key, r0, r1)
        self.write_rotated(q, k, v, cos, sin, index)

    def write_rotated(self, q, k, v, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
        """Rotary by cos, sin on q (in place) and k; k, v into the cache at cache ``positions`` (a ring
        layer maps them to its slots; pairwise-interleaved rotary (GLM) rotates outside the fused op)."""
        index = self.kv.slots(positions)
        if self.mb.adapter.rope_interleaved:
            write_interleaved(q, k, v, cos, sin, self.kv, index)
            return
        ops.rotary_kv_write(q, k, v, cos, sin, self.kv.k_buf, self.kv.v_buf, index)

    def o_proj(self, shape: torch.Size, attn: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [B, heads, c, D] (and the norm on it, where the layer has one)."""
        lb = self.lb
        b, c, _ = shape
        o = linear(attn.transpose(1, 2).reshape(b, c, lb.n_q * lb.head_dim), lb.o_proj, self.gemv_rows)
        return o if lb.attn_out_norm is None else self.norm(o, lb.attn_out_norm)

    def down(self, act: torch.Tensor) -> torch.Tensor:
        lb = self.lb
        down = linear(act, lb.down, self.gemv_rows)
        return down if lb.mlp_out_norm is None else self.norm(down, lb.mlp_out_norm)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """o_proj, the MLP's norm and the MLP for rows x [B, c, H], the attention's residual added in
        place; returns the MLP output (not yet added)."""
        o = self.o_proj(x.shape, attn)
        ops.fused_add_rms_norm(o, x, self.lb.mlp_norm.weight, self.eps, gemma=self.gemma)
        if self.lb.experts is not None:
            out = moe_mlp(self.lb, self.mb.adapter.moe, o)
            return out if self.lb.mlp_out_norm is None else self.norm(out, self.lb.mlp_out_norm)
        return self.down(self.act(o))

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return gate_up_weights(self.lb)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of the MLP: into the reused buffer, or for a decode step in one launch."""
        lb, mb = self.lb, self.mb
        b, c, _ = h.shape
        inter = lb.down.weight.shape[1]
        gate_w, up_w, biased = self.gate_up_weights()
        if not biased and takes_gemv(h, self.gemv_rows, gate_w, up_w):
            return ops.gemv_act_and_mul(h, gate_w, up_w, mb.act, approximate=mb.act_approximate)
        act = self.act_buf[: b * c * inter].view(b, c, inter)
        if len(lb.gate_up) == 1:
            gate, up = linear(h, lb.gate_up[0], self.gemv_rows), None
        else:
            gate, up = linear(h, lb.gate_up[0], self.gemv_rows), linear(h, lb.gate_up[1], self.gemv_rows)
        if mb.act == "silu":
            ops.silu_and_mul(gate, up, out=act)
        else:
            ops.gelu_and_mul(gate, up, approximate=mb.act_approximate, out=act)
        return act
