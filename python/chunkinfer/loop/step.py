"""A step: 1 to STEP_TOKENS new tokens per sequence on a cache, through every layer on the decode
kernels. Positions, write index and lengths live in device tensors, so the same launches serve every
step of a length (what decode_graph.py captures).

Exactness (batch 1): each row of a T-token step is computed exactly as a one-token step at its
position computes it — the projections by the gemv ops, whose per-row arithmetic does not depend on
how many rows a call holds (on CUDA groups of at most ops.GEMV_MAX_ROWS rows, on the CPU all); attention by
decode_attention split at fixed key positions (the cache's ``split_keys``); the LM head by the gemv
too. So speculative verification reproduces plain greedy decoding bit for bit. With a larger batch
the projections are matrix products (cuBLAS), exact to rounding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..kv.cache import ChunkKVCache
from ..kv.device_layer import STEP_TOKENS, KVBuffers
from ..kv.ring import RING_DECODE
from .attention import block_attention, first_key, with_sinks
from ..models.adapters import ModelBinding
from .head import final_norm, logits_of, softcap
from . import layer as layer_mod
from .layer import LayerOps, act_buffer, gate_up_weights
from .rope import Rope



@dataclass
class DeviceStep:
    """A step's varying numbers as device tensors (their values change, their storage does not)."""

    write_index: torch.Tensor    # [T] int64: the cache positions the new tokens' K, V go to
    seq_lens: torch.Tensor       # [B] int32: cached length after the write
    starts: torch.Tensor | None  # [B] int32: first visible position (left padding), or None
    split_keys: int              # decode attention's split of the keys (the cache's, fixed)

    def to(self, device: torch.device) -> "DeviceStep":
        if self.write_index.device == device:
            return self
        return DeviceStep(self.write_index.to(device), self.seq_lens.to(device),
                          None if self.starts is None else self.starts.to(device), self.split_keys)


def row_groups(rows: int, device: torch.device) -> list[tuple[int, int]]:
    """[r0, r1) groups covering [0, rows), each as many rows as one gemv call takes on the device."""
    g = max(1, ops.gemv_rows_per_call(device, rows))
    return [(r0, min(r0 + g, rows)) for r0 in range(0, rows, g)]


def exact_rows(mb: ModelBinding, x: torch.Tensor) -> bool:
    """Whether a step on x [B, T, H] runs row by row on the gemv ops: batch 1, and the gemv takes every
    weight of every layer and the LM head for a group of rows. Asked once per device and dtype."""
    if x.shape[0] != 1:
        return False
    key = ("exact step", x.device, x.dtype)
    if key not in mb.memo:
        def rows_of(width: int) -> torch.Tensor:  # what a group of rows looks like to a projection
            return torch.empty(1, ops.gemv_rows_per_call(x.device, ops.GEMV_MAX_ROWS), width, dtype=x.dtype,
                               device=x.device)

        def takes(m) -> bool:
            return ops.gemv_supports(rows_of(m.weight.shape[1]), m.weight)

        ok = takes(mb.lm_head) and getattr(mb.lm_head, "bias", None) is None
        ok = ok and all(lb.experts is None for lb in mb.layers)  # a mixture of experts: loop/moe.py's rows
        for lb in mb.layers if ok else ():
            gate, up, biased = gate_up_weights(lb)
            ok = (ok and not biased and ops.gemv_supports(rows_of(x.shape[-1]), *(m.weight for m in lb.qkv), gate, up)
                  and takes(lb.o_proj) and takes(lb.down))
        mb.memo[key] = ok
    return mb.memo[key]


def device_attention(layer: LayerOps, q: torch.Tensor, step: DeviceStep) -> torch.Tensor:
    """q [B, T, Hq, D] over the layer's K, V buffers; [B, Hq, T, D]. The step writes only its new tokens'
    K, V (just before) and sets the lengths before its first kernel: the attention may start loading
    older keys early (prefix_ready)."""
    lb = layer.lb
    if (lb.window and not RING_DECODE) or not ops.decode_kernel_supports(lb.head_dim, q.device):
        return eager_step_attention(layer, q, step)
    attn, lse = ops.decode_attention(q.transpose(1, 2), layer.kv.k_buf, layer.kv.v_buf, step.seq_lens, step.starts,
                                     scale=lb.scale, window=lb.window or 0, prefix_ready=True,
                                     split_keys=step.split_keys)
    return attn if lb.sinks is None else with_sinks(attn, lse, lb.sinks)


def eager_step_attention(layer: LayerOps, q: torch.Tensor, step: DeviceStep) -> torch.Tensor:
    """A step's attention by the prefill's block_attention over the keys in view, in order: for a head
    dim the decode kernel lacks on this device (ops.decode_kernel_supports), or a sliding-window layer
    while decode_attention has no ring semantics (kv/ring.py RING_DECODE). Eager only: it reads the
    step's position and padding on the host. Exact to rounding; a T-token step's rows are not promised
    bit for bit equal to one-token steps here."""
    lb, t = layer.lb, q.shape[1]
    past = int(step.write_index[0])
    starts = None if step.starts is None else step.starts.tolist()
    lo = first_key(past, lb.window)
    keys, values = layer.kv.band(lo, past + t)
    return block_attention(q.transpose(1, 2), keys, values, past, starts, lb.window, lb.scale, key_offset=lo,
                           sinks=lb.sinks)


# (layer, q [B, T, Hq, D]) -> attention [B, Hq, T, D]: device_attention, or over host-resident KV
Attend = Callable[[LayerOps, torch.Tensor], torch.Tensor]


@dataclass
class LayerSource:
    """Where a step finds each layer's K, V: the cache's own buffers, or (host-resident layers) staged
    buffers and an attention over the host part too, with a hook when the layer is done."""

    kv: Callable[[int], KVBuffers]
    attend: Callable[[int], Attend | None]   # None: device_attention
    done: Callable[[int], None] = lambda li: None


def exact_block(layer: LayerOps, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: DeviceStep,
                pending: torch.Tensor | None, spare: torch.Tensor, attend: Attend) -> torch.Tensor:
    """One layer on the residual rows x [1, T, H], group by group on the gemv ops. ``pending`` is the
    previous layer's MLP output, not yet in the residual; returns this layer's. Each norm (with the
    residual add before it) runs inside the projection after it: the residual goes to ``spare`` and
    back (the projection's blocks all read the residual, so it is not updated in place)."""
    lb, mb = layer.lb, layer.mb
    groups = row_groups(x.shape[1], x.device)
    qs = []
    for r0, r1 in groups:
        add = None if pending is None else pending[:, r0:r1]
        q, k, v = layer.qkv(x[:, r0:r1], want_q=True,
                            norm=layer.prologue(lb.input_norm, add=add, residual_out=spare[:, r0:r1]))
        layer.write_rotated(q, k, v, cos[:, r0:r1], sin[:, r0:r1], step.write_index[r0:r1])
        qs.append(q)
    attn = attend(layer, qs[0] if len(qs) == 1 else torch.cat(qs, dim=1))
    gate, up, _ = layer.gate_up_weights()
    outs = []
    for r0, r1 in groups:
        o = layer.o_proj(x[:, r0:r1].shape, attn[:, :, r0:r1])
        act = ops.gemv_act_and_mul(spare[:, r0:r1], gate, up, mb.act, approximate=mb.act_approximate,
                                   norm=layer.prologue(lb.mlp_norm, add=o, residual_out=x[:, r0:r1]))
        outs.append(layer.down(act))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def matrix_block(layer: LayerOps, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: DeviceStep,
                 pending: torch.Tensor | None, attend: Attend) -> torch.Tensor:
    """One layer on the residual rows x [B, T, H] by matrix products; returns the MLP output (not added)."""
    lb = layer.lb
    if pending is None:
        h = layer.norm(x, lb.input_norm)
    else:
        ops.fused_add_rms_norm(pending, x, lb.input_norm.weight, layer.eps, gemma=layer.gemma)
        h = pending
    q, k, v = layer.qkv(h, want_q=True)
    layer.write_rotated(q, k, v, cos, sin, step.write_index)
    return layer.finish(x, attend(layer, q))


def step_logits(mb: ModelBinding, cache: ChunkKVCache, ids: torch.Tensor | None, embeds: torch.Tensor | None,
                positions: torch.Tensor, step: DeviceStep, keep: int, source: LayerSource | None = None) -> torch.Tensor:
    """The logits [B, keep, V] of the last ``keep`` rows of a step of T tokens (ids [B, T], or embeds
    [B, T, H]) at rotary ``positions`` [B or 1, T]; their K, V written at ``step.write_index``. The
    cache layers (or ``source``'s buffers) must already have room for the write."""
    hidden = mb.embed(ids) if embeds is None else embeds.clone()
    b, t, _ = hidden.shape
    exact = mb.devices.single and exact_rows(mb, hidden)
    buf = None if exact else act_buffer(mb, hidden, b * t)
    spare = torch.empty_like(hidden) if exact else None  # the residual's second buffer (exact_block)
    per_device: dict = {}  # a model spread over devices: its rotary tables and step tensors on each
    pending = None
    here = hidden.device
    for li, lb in enumerate(mb.layers):
        device = mb.devices.layers[li]
        if device != here:  # the residual stream moves once per device boundary
            here = device
            hidden = layer_mod.to_layer_device(hidden, device)
            pending = None if pending is None else pending.to(device)
            buf = act_buffer(mb, hidden, b * t)
        if device not in per_device:
            per_device[device] = (Rope(mb, positions, hidden, single_block=True), step.to(device))
        rope, dstep = per_device[device]
        kv = cache.layers[li] if source is None else source.kv(li)
        attend = (None if source is None else source.attend(li)) or (
            lambda lo, q, dstep=dstep: device_attention(lo, q, dstep))
        layer = LayerOps(mb, lb, kv, rope, buf, ops.gemv_rows_per_call(hidden.device, t) if exact else 1)
        cos, sin = rope.get(lb.rope_key, 0, t)
        with mb.devices.onloaded(li):  # accelerate-offloaded weights: loaded for the layer
            if exact:
                pending = exact_block(layer, hidden, cos, sin, dstep, pending, spare, attend)
            else:
                pending = matrix_block(layer, hidden, cos, sin, dstep, pending, attend)
        if source is not None:
            source.done(li)
    if not exact:
        hidden.add_(pending)
        return logits_of(mb, final_norm(mb, hidden[:, t - keep:]))
    # the last layer's MLP output joins the residual inside the LM head's gemv, with the final norm
    rows = []
    for r0, r1 in row_groups(keep, hidden.device):
        a, z = t - keep + r0, t - keep + r1
        norm = ops.NormPrologue(mb.final_norm.weight, mb.norm_eps, mb.adapter.gemma_norms, add=pending[:, a:z])
        rows.append(ops.gemv(hidden[:, a:z], [mb.lm_head.weight], None, norm=norm))
    return softcap(mb, rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))


def choose_split_keys(mb: ModelBinding, length: int, batch: int, device: torch.device) -> int:
    """The key-range length decode attention splits into for a cache first stepped at ``length``
    positions: pieces for about two waves of blocks then (two resident blocks per multiprocessor on CUDA,
    four tasks per thread on the CPU; the kernel sends the pieces out split by split, so the empty ones
    at the end cost nothing), a power of two of at least 256 positions (a multiple of every kernel's keys
    per load step). Fixed for the cache's life: a row's attention then reduces over the same pieces
    whatever the step's length."""
    heads = batch * max(lb.n_kv for lb in mb.layers)
    if device.type == "cuda":
        wave = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        wave = 4 * torch.get_num_threads()
    want = max(1, -(-length * heads // (2 * wave)))
    return max(256, 1 << (want - 1).bit_length())


def reserve(mb: ModelBinding, cache: ChunkKVCache, batch: int, end: int, new_tokens: int = 1) -> None:
    """Room for positions [0, end) in every layer, on the device the layer runs on, written ``new_tokens``
    at a time (a sliding-window layer's ring keeps its window plus them)."""
    dtype = mb.embed.weight.dtype
    for layer, lb, device in zip(cache.layers, mb.layers, mb.devices.layers):
        layer.reserve(batch, lb.n_kv, lb.head_dim, dtype, device, end, new_tokens=new_tokens)


def device_step(cache: ChunkKVCache, past: int, t: int, batch: int, key_starts: list[int] | None,
                device: torch.device) -> DeviceStep:
    return DeviceStep(write_index=torch.arange(past, past + t, device=device),
                      seq_lens=torch.full((batch,), past + t, dtype=torch.int32, device=device),
                      starts=None if key_starts is None else torch.tensor(key_starts, dtype=torch.int32, device=device),
                      split_keys=cache.split_keys)
