"""A step over a cache with host-resident layers: each such layer's cached K, V are read once for all the
step's tokens — streamed into a staging slot, and (``cpu_attention``) the first part of them attended on
the CPU where they live, merged with the GPU's part by log-sum-exp (kv/host_attention.py)."""
from __future__ import annotations

import functools

import torch

from .. import ops
from ..kv.cache import ChunkKVCache
from ..kv.host_attention import SplitStep, split_decode_attention
from ..kv.offload import LayerStreamer
from ..models.adapters import ModelBinding
from .layer import LayerOps
from .step import LayerSource, device_step, step_logits


def offloaded_step_logits(mb: ModelBinding, cache: ChunkKVCache, ids: torch.Tensor | None,
                          embeds: torch.Tensor | None, positions: torch.Tensor | None, past: int,
                          key_starts: list[int] | None, keep: int) -> torch.Tensor:
    """step_logits for a cache some of whose layers live in pinned host memory (eager: the host waits
    for each CPU-attended layer's query)."""
    x = ids if ids is not None else embeds
    b, t = x.shape[:2]
    weight = mb.embed.weight
    device, end = weight.device, past + t
    resident = [li for li in range(len(mb.layers)) if li not in set(cache.streamed_layers())]
    for li in resident:
        lb = mb.layers[li]
        cache.layers[li].reserve(b, lb.n_kv, lb.head_dim, weight.dtype, device, end, new_tokens=t)

    def shape_of(li: int):
        return b, mb.layers[li].n_kv, mb.layers[li].head_dim, weight.dtype

    streamer = LayerStreamer.for_call(cache, shape_of, past, end, 0, step=True,
                                      attends_all=lambda li: not mb.layers[li].window and mb.layers[li].sinks is None and ops.decode_kernel_supports(
                                          mb.layers[li].head_dim, device))
    splits: dict = {}  # (n_q, head_dim) -> the SplitStep of this call's CPU-attended host layers

    def kv(li: int):
        return streamer.begin(li) if streamer.is_streamed(li) else cache.layers[li]

    def attend(li: int):
        n_cpu = streamer.cpu_keys.get(li, 0)
        if not n_cpu:
            return None
        lb = mb.layers[li]
        key = (lb.n_q, lb.head_dim)
        if key not in splits:
            splits[key] = SplitStep.build(n_cpu, end, key_starts, b, lb.n_q, t, lb.head_dim, weight.dtype, device)

        def run(layer: LayerOps, q: torch.Tensor) -> torch.Tensor:
            return split_decode_attention(q.transpose(1, 2), layer.kv, cache.layers[li], splits[key], lb.scale,
                                          cache.host.cpu_share)
        return run

    def done(li: int) -> None:
        if streamer.is_streamed(li):
            streamer.finish(li)

    if positions is None:
        positions = torch.arange(past, end, device=device)[None]
    failed = True
    try:
        logits = step_logits(mb, cache, ids, embeds, positions.to(device), device_step(cache, past, t, b, key_starts,
                                                                                       device),
                             keep, LayerSource(kv, attend, done))
        failed = False
    finally:
        streamer.close(failed)
    return logits
