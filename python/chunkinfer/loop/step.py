"""A decode step: one new token per sequence through every layer with its positions, write index and
lengths in device tensors, so the same launches serve every step (what decode_graph.py captures)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..kv.cache import ChunkKVCache
from ..models.adapters import ModelBinding
from .attention import with_sinks
from .layer import LayerOps, act_buffer, one_row_gemv
from .rope import Rope


@dataclass
class DeviceStep:
    """A decode step's varying numbers as device tensors (their values change, their storage does not)."""

    write_index: torch.Tensor  # [1] int64: the cache position the new token's K, V go to
    seq_lens: torch.Tensor     # [B] int32: cached length after the write
    starts: torch.Tensor | None  # [B] int32: first visible position (left padding), or None


def _gemv_gate_up(layer: LayerOps, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The MLP's gate and up weights when a decode step's q|k|v and act(gate)*up both go to the
    gemv ops, norms included; None when they do not."""
    if layer.lb.experts is not None:  # a mixture of experts (loop/moe.py) has no single gate and up
        return None
    gate_w, up_w, biased = layer.gate_up_weights()
    if biased or not one_row_gemv(x, *(m.weight for m in layer.lb.qkv), gate_w, up_w):
        return None
    return gate_w, up_w


def _attention(layer: LayerOps, q: torch.Tensor, step: DeviceStep) -> torch.Tensor:
    lb = layer.lb
    # the step writes only the new token's K, V (rotary_kv_write, just before) and sets the lengths
    # before its first kernel: the attention may start loading older keys early
    attn, lse = ops.decode_attention(q.transpose(1, 2), layer.kv.k_buf, layer.kv.v_buf, step.seq_lens,
                                     step.starts, scale=lb.scale, window=lb.window or 0, prefix_ready=True)
    return attn if lb.sinks is None else with_sinks(attn, lse, lb.sinks)


def decode_block(layer: LayerOps, x: torch.Tensor, step: DeviceStep, pending: torch.Tensor | None,
                 spare: torch.Tensor) -> torch.Tensor:
    """One layer on the residual rows x [B, 1, H]. ``pending`` is the previous layer's MLP output, not
    yet in the residual; returns this layer's, for the next layer (or the caller) to add. Where the
    gemv ops serve the layer, each norm (with the residual add before it) runs inside the projection
    after it: the residual goes to ``spare`` and back (the projection's blocks all read the residual,
    so it is not updated in place)."""
    lb = layer.lb
    gate_up = _gemv_gate_up(layer, x)
    if gate_up is not None:
        q, k, v = layer.qkv(x, want_q=True, norm=layer.prologue(lb.input_norm, add=pending, residual_out=spare))
        layer.rotate_and_write(q, k, v, 0, 1, layer.kv.slots(step.write_index))
        o = layer.o_proj(x.shape, _attention(layer, q, step))
        act = ops.gemv_act_and_mul(spare, *gate_up, layer.mb.act, approximate=layer.mb.act_approximate,
                                   norm=layer.prologue(lb.mlp_norm, add=o, residual_out=x))
        return layer.down(act)
    if pending is None:
        h = layer.norm(x, lb.input_norm)
    else:
        ops.fused_add_rms_norm(pending, x, lb.input_norm.weight, layer.eps, gemma=layer.gemma)
        h = pending
    q, k, v = layer.qkv(h, want_q=True)
    layer.rotate_and_write(q, k, v, 0, 1, layer.kv.slots(step.write_index))
    return layer.finish(x, _attention(layer, q, step))


def run_decode_layers(mb: ModelBinding, cache: ChunkKVCache, hidden: torch.Tensor, positions: torch.Tensor,
                      step: DeviceStep) -> None:
    """Every layer on one new token per sequence (``hidden`` [B, 1, H], updated in place) at rotary
    ``positions`` [B or 1, 1]; the cache layers must already have capacity for the write."""
    rope = Rope(mb, positions, hidden, single_block=True)
    buf = act_buffer(mb, hidden, hidden.shape[0])
    spare = torch.empty_like(hidden)  # the residual's second buffer (decode_block)
    pending = None
    for li, lb in enumerate(mb.layers):
        pending = decode_block(LayerOps(mb, lb, cache.layers[li], rope, buf), hidden, step, pending, spare)
    hidden.add_(pending)
