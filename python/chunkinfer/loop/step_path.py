"""Where a step on a cache runs: a captured CUDA graph, eagerly, or streaming host-resident layers; and
the cache's fixed attention split, chosen at its first step."""
from __future__ import annotations

import torch

from ..kv.cache import ChunkKVCache
from .offload_step import offloaded_step_logits
from .step import choose_split_keys, device_step, reserve, step_logits


def run_step(state, cache: ChunkKVCache, ids: torch.Tensor | None, embeds: torch.Tensor | None,
             positions: torch.Tensor | None, past: int, key_starts: list[int] | None, keep: int) -> torch.Tensor:
    """T new tokens per sequence (ids [B, T] or embeds [B, T, H]) on a cache holding ``past`` positions,
    at rotary ``positions`` [B or 1, T] (None: the cache positions); returns the last ``keep`` rows'
    logits [B, keep, V]. The cache then holds past + T positions."""
    mb = state.binding
    x = ids if ids is not None else embeds
    b, t = x.shape[:2]
    weight = mb.embed.weight
    if not cache.split_keys:
        cache.split_keys = choose_split_keys(mb, past + t, b, mb.devices.layers[0])
    if cache.streamed_layers():
        logits = offloaded_step_logits(mb, cache, ids, embeds, positions, past, key_starts, keep)
    elif ids is not None and state.cuda_graphs and state.graphs.supported(mb, weight.device, weight.dtype):
        logits = state.graphs.step(mb, cache, ids, positions, past, key_starts, keep)
    else:
        reserve(mb, cache, b, past + t, t)
        device = mb.devices.layers[0]
        if positions is None:
            positions = torch.arange(past, past + t, device=device)[None]
        logits = step_logits(mb, cache, ids, embeds, positions.to(device),
                             device_step(cache, past, t, b, key_starts, device), keep)
    for layer in cache.layers:
        layer.length = past + t
    cache.key_starts = key_starts
    return logits
