"""Decode steps as CUDA graphs: one captured step per batch size, replayed while the cache grows.

Everything that changes between steps (token ids, rotary positions, the cache write index, the cached
lengths) lives in device tensors, updated in place before a replay (the lengths by the graph itself,
from the write index), and attention reads the lengths on the device (``ops.decode_attention``), so
the launch sequence never changes. A graph is recaptured only when the cache's buffers are
reallocated (capacity growth, 1.25x at a time).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .. import ops
from ..models.adapters import ModelBinding
from ..kv.cache import ChunkKVCache
from .head import final_norm, logits_of
from .step import DeviceStep, run_decode_layers


# Sliding-window layers are rings (kv/ring.py): the decode kernel must read position p at slot p % capacity
# with lengths beyond the capacity. Until its ring semantics land, sliding-window models decode eagerly
# (block_attention over the ring's band), which is exact.
RING_DECODE = False


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor        # [B, 1] int64 (static input)
    positions: torch.Tensor  # [B, 1] int64 rotary positions (static input): a view of past
    past: torch.Tensor       # [B + 1] int64: the positions, then the write index (one fill for both)
    step: DeviceStep         # write index, lengths, starts (static inputs)
    logits: torch.Tensor     # [B, 1, V] (static output)
    buffers: tuple           # data pointers of the cache buffers the graph reads and writes
    starts_host: tuple | None
    buffer_refs: list        # the buffer tensors last seen at those pointers (weak)
    capacity: float          # positions a step can reach in those buffers (inf: rings and no full layer)


def graph_decode_supported(mb: ModelBinding, device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA, fp16/bf16, head dims the decode kernel has, and rotary frequencies that do not depend on
    the call (dynamic/longrope read the maximum position on the host, which a replayed graph cannot);
    the whole model on one device (one graph, no offloaded weights loaded by hooks)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not mb.rope_needs_global_max
            and mb.devices.single and all(ops.decode_kernel_supports(lb.head_dim, device) for lb in mb.layers)
            and (RING_DECODE or not any(lb.window for lb in mb.layers)))


def _buffers(cache: ChunkKVCache) -> tuple:
    # addresses and shapes: a new cache may reuse freed addresses with another capacity (other strides)
    return tuple((layer.k_buf.data_ptr(), layer.v_buf.data_ptr(), tuple(layer.k_buf.shape)) for layer in cache.layers)


def _buffer_refs(cache: ChunkKVCache) -> list:
    """Weak references to the cache's buffer tensors: while each still names a layer's current buffer,
    the addresses the graph was captured with are valid (a tensor keeps its storage), and checking
    that costs less than reading every address (a step's host time adds to its latency)."""
    return [weakref.ref(t) for layer in cache.layers for t in (layer.k_buf, layer.v_buf)]


def _same_buffers(refs: list, cache: ChunkKVCache) -> bool:
    it = iter(refs)
    return len(refs) == 2 * len(cache.layers) and all(
        next(it)() is layer.k_buf and next(it)() is layer.v_buf for layer in cache.layers)


def step_logits(mb: ModelBinding, cache: ChunkKVCache, ids: torch.Tensor, positions: torch.Tensor,
                step: DeviceStep) -> torch.Tensor:
    """The logits [B, 1, V] of one decode step (what a graph captures): ids [B, 1] at rotary
    ``positions``, K, V written at ``step.write_index``."""
    # the lengths after the write, from the write index on the device: a ~1 us kernel in the graph
    # instead of a fill launched from the host before each replay
    torch.add(step.write_index.expand(step.seq_lens.shape[0]), 1, out=step.seq_lens)
    hidden = mb.embed(ids)
    run_decode_layers(mb, cache, hidden, positions, step)
    return logits_of(mb, final_norm(mb, hidden))


class DecodeGraphs:
    """The captured decode steps of one converted model, by batch size."""

    def __init__(self) -> None:
        self._by_batch: dict[int, _Captured] = {}
        self._supported: dict[tuple, bool] = {}

    def clear(self) -> None:
        self._by_batch.clear()
        self._supported.clear()

    def supported(self, mb: ModelBinding, device: torch.device, dtype: torch.dtype) -> bool:
        """graph_decode_supported, asked once per device and dtype (the binding does not change)."""
        key = (device, dtype)
        if key not in self._supported:
            self._supported[key] = graph_decode_supported(mb, device, dtype)
        return self._supported[key]

    def step(self, mb: ModelBinding, cache: ChunkKVCache, ids: torch.Tensor, positions: torch.Tensor | None,
             past: int, key_starts: list[int] | None) -> torch.Tensor:
        """Run one decode step (ids [B, 1]) on a cache holding ``past`` positions, growing it when
        full; returns logits [B, 1, V]. ``positions`` [1 or B, 1] are the rotary positions, None for
        ``past``."""
        b = ids.shape[0]
        starts_host = tuple(key_starts) if key_starts else None
        cap = self._by_batch.get(b)
        if (cap is None or cap.starts_host != starts_host or past >= cap.capacity
                or not _same_buffers(cap.buffer_refs, cache)):
            cap = self._prepare(mb, cache, ids, positions, past, starts_host)
        cap.ids.copy_(ids)
        if positions is None:  # the default: the token's cache position, and the write index, in one fill
            cap.past.fill_(past)
        else:
            cap.positions.copy_(positions.expand(b, 1))
            cap.step.write_index.fill_(past)
        cap.graph.replay()
        return cap.logits.clone()  # the static output is overwritten by the next replay

    def _prepare(self, mb, cache, ids, positions, past, starts_host) -> _Captured:
        """Room for position ``past`` in every layer, and a graph over the cache's buffers as they
        are now: the one held for this batch when their addresses and shapes are the ones it was
        captured with (also a new cache the allocator placed where the last one was), else a new one."""
        b, weight = ids.shape[0], mb.embed.weight
        for layer, lb in zip(cache.layers, mb.layers):
            layer.reserve(b, lb.n_kv, lb.head_dim, weight.dtype, weight.device, past + 1)
        cap = self._by_batch.get(b)
        if cap is None or cap.starts_host != starts_host or cap.buffers != _buffers(cache):
            cap = self._capture(mb, cache, ids, positions, past, starts_host)
            self._by_batch[b] = cap
        cap.buffer_refs = _buffer_refs(cache)
        cap.capacity = min(layer.position_limit() for layer in cache.layers)  # a wrapped ring: unbounded
        return cap

    def _capture(self, mb, cache, ids, positions, past, starts_host) -> _Captured:
        b, device = ids.shape[0], ids.device
        past_buf = torch.full((b + 1,), past, dtype=torch.long, device=device)  # positions, then the write index
        step = DeviceStep(
            write_index=past_buf[b:],
            seq_lens=torch.full((b,), past + 1, dtype=torch.int32, device=device),
            starts=None if starts_host is None else torch.tensor(starts_host, dtype=torch.int32, device=device),
        )
        static_ids = ids.clone()
        static_pos = past_buf[:b].view(b, 1)
        if positions is not None:
            static_pos.copy_(positions.expand(b, 1))
        # Warm-up on a side stream (cuBLAS workspaces, lazy inits). Writing this step's K, V is
        # idempotent, so running the step here and again at the replay changes nothing.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step_logits(mb, cache, static_ids, static_pos, step)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step_logits(mb, cache, static_ids, static_pos, step)
        return _Captured(graph, static_ids, static_pos, past_buf, step, logits, _buffers(cache), starts_host,
                         buffer_refs=[], capacity=0)  # set by _prepare
