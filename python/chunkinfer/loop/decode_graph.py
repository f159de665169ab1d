"""Steps as CUDA graphs: one per batch size, step length, kept rows and padding, replayed while the
cache grows.

Everything that changes between steps (token ids, rotary positions, the cache write index, the cached
lengths) lives in device tensors, updated in place before a replay, and attention reads the lengths on
the device (``ops.decode_attention``), so the launch sequence never changes. A graph is recaptured
only when the cache's buffers are reallocated (capacity growth, 1.25x at a time) or its padding changes.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .. import ops
from ..kv.cache import ChunkKVCache
from ..kv.ring import RING_DECODE
from ..models.adapters import ModelBinding
from .step import DeviceStep, device_step, reserve, step_logits

_MAX_GRAPHS = 16  # captured steps kept per model (batch size x step length x kept rows), least recent dropped


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor        # [B, T] int64 (static input)
    positions: torch.Tensor  # [B, T] int64 rotary positions (static input)
    step: DeviceStep         # write index, lengths, starts (static inputs)
    logits: torch.Tensor     # [B, keep, V] (static output)
    buffers: tuple           # data pointers of the cache buffers the graph reads and writes
    buffer_refs: list        # the buffer tensors last seen at those pointers (weak)
    capacity: float          # positions those buffers hold (inf: rings only)
    split_keys: int


def graph_decode_supported(mb: ModelBinding, device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA, fp16/bf16, head dims the decode kernel has, and rotary frequencies that do not depend on
    the call (dynamic/longrope read the maximum position on the host, which a replayed graph cannot);
    the whole model on one device (one graph, no offloaded weights loaded by hooks)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not mb.rope_needs_global_max
            and mb.devices.single and all(ops.decode_kernel_supports(lb.head_dim, device) for lb in mb.layers)
            and (RING_DECODE or not any(lb.window for lb in mb.layers)))  # kv/ring.py


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


class DecodeGraphs:
    """The captured steps of one converted model, by (batch size, step length, kept rows, padding)."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._supported: dict[tuple, bool] = {}

    def clear(self) -> None:
        self._graphs.clear()
        self._supported.clear()

    def __len__(self) -> int:
        """Graphs held."""
        return len(self._graphs)

    def captured(self, batch: int, tokens: int, keep: int, key_starts: tuple | None = None) -> _Captured | None:
        """The graph held for a step of this shape, if any."""
        return self._graphs.get((batch, tokens, keep, key_starts))

    def supported(self, mb: ModelBinding, device: torch.device, dtype: torch.dtype) -> bool:
        """graph_decode_supported, asked once per device and dtype (the binding does not change)."""
        key = (device, dtype)
        if key not in self._supported:
            self._supported[key] = graph_decode_supported(mb, device, dtype)
        return self._supported[key]

    def step(self, mb: ModelBinding, cache: ChunkKVCache, ids: torch.Tensor, positions: torch.Tensor | None,
             past: int, key_starts: list[int] | None, keep: int) -> torch.Tensor:
        """Run one step (ids [B, T]) on a cache holding ``past`` positions, growing it when full;
        returns the last ``keep`` rows' logits [B, keep, V]. ``positions`` [1 or B, T] are the rotary
        positions, None for the cache positions."""
        b, t = ids.shape
        key = (b, t, keep, tuple(key_starts) if key_starts else None)
        cap = self._graphs.get(key)
        if (cap is None or past + t > cap.capacity or cap.split_keys != cache.split_keys
                or not _same_buffers(cap.buffer_refs, cache)):
            cap = self._prepare(mb, cache, key, ids, positions, past, key_starts, keep)
        self._graphs.move_to_end(key)
        cap.ids.copy_(ids)
        if positions is None:
            torch.arange(past, past + t, out=cap.positions[0])
            if b > 1:
                cap.positions[1:].copy_(cap.positions[0])
        else:
            cap.positions.copy_(positions.expand(b, t))
        torch.arange(past, past + t, out=cap.step.write_index)
        cap.graph.replay()
        return cap.logits.clone()  # the static output is overwritten by the next replay

    def _prepare(self, mb, cache, key, ids, positions, past, key_starts, keep) -> _Captured:
        """Room for the step in every layer, and a graph over the cache's buffers as they are now: the one
        held for this key when their addresses and shapes are the ones it was captured with (also a new
        cache the allocator placed where the last one was), else a new one."""
        b, t = ids.shape
        reserve(mb, cache, b, past + t, t)
        cap = self._graphs.get(key)
        if cap is None or cap.buffers != _buffers(cache) or cap.split_keys != cache.split_keys:
            cap = self._capture(mb, cache, ids, positions, past, key_starts, keep)
            self._graphs[key] = cap
            while len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)
        cap.buffer_refs = _buffer_refs(cache)
        cap.capacity = min(layer.position_limit(t) for layer in cache.layers)  # a ring past its window: unbounded
        return cap

    def _capture(self, mb, cache, ids, positions, past, key_starts, keep) -> _Captured:
        b, t = ids.shape
        device = ids.device
        step = device_step(cache, past, t, b, key_starts, device)
        # the lengths after the write, from the write index on the device: a kernel in the graph instead
        # of a fill launched from the host before each replay
        static_ids = ids.clone()
        static_pos = (torch.arange(past, past + t, device=device)[None] if positions is None
                      else positions.to(device)).expand(b, t).contiguous()

        def run() -> torch.Tensor:
            torch.add(step.write_index[-1:].expand(b), 1, out=step.seq_lens)
            return step_logits(mb, cache, static_ids, None, static_pos, step, keep)

        # Warm-up on a side stream (cuBLAS workspaces, lazy inits). Writing this step's K, V is
        # idempotent, so running the step here and again at the replay changes nothing.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = run()
        return _Captured(graph, static_ids, static_pos, step, logits, _buffers(cache), buffer_refs=[], capacity=0,
                         split_keys=cache.split_keys)
