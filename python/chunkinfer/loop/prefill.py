"""The chunked layer loop over a prompt: layer-major, chunk by chunk, K, V written in place into the cache.

Only the residual stream [B, S, H] and the cache are whole-sequence tensors; every other tensor is the
size of one chunk, and the MLP activation goes into one buffer reused by every chunk and layer. Per
layer, per chunk: norm -> q, k, v -> rotary + K, V into the layer's buffer -> attention against the
prefix (attention.py) -> o_proj -> residual in place -> MLP. Host-resident layers are streamed through
the device (kv/offload.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kv.cache import ChunkKVCache
from ..kv.device_layer import PREFILL_HEADROOM, KVBuffers
from ..kv.ring import STEP_TOKENS, RingKVLayer
from ..kv.offload import LayerStreamer
from ..models.adapters import LayerBinding, ModelBinding
from .. import ops
from . import layer as layer_mod
from .attention import block_attention, first_key
from .layer import LayerOps, act_buffer
from .rope import Rope


@dataclass
class LoopInputs:
    hidden: torch.Tensor            # [B, S, H] residual stream; updated in place
    position_ids: torch.Tensor      # [B or 1, S] rotary positions
    start: int                      # cache positions already filled before this call
    key_starts: list[int] | None    # per-sequence first visible cache position (left padding)
    chunk: int                      # rows per chunk; with ``chunks``, the smallest of them
    last_rows_from: int = 0         # the last layer computes outputs only for rows >= this
    hidden_states: list | None = None  # collects the input of every layer when not None
    write_index: torch.Tensor | None = None  # [S] int64 cache positions of the rows (start + arange(S))
    progress: Callable[[int, int], None] | None = None  # (chunks done, chunks in all) after each chunk
    chunks: list[int] | None = None  # per layer (the planner's non-increasing schedule); None: ``chunk``


def kv_only(layer: LayerOps, inp: LoopInputs, r0: int, r1: int) -> None:
    """Write the layer's K, V for rows [r0, r1) without computing anything else."""
    h = layer.norm(inp.hidden[:, r0:r1], layer.lb.input_norm)
    _, k, v = layer.qkv(h, want_q=False)
    layer.rotate_and_write(None, k, v, r0, r1, inp.write_index[r0:r1])


def sample_kv(mb: ModelBinding, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's K, V [B, Hkv, n, D] of the embedded rows hidden [B, n, H] at position_ids [B or 1, n], as
    the loop writes them into the cache: a sample of the prompt's K, V (the codec's calibration)."""
    lb = mb.layers[0]
    b, n, _ = hidden.shape
    kv = KVBuffers()
    kv.reserve(b, lb.n_kv, lb.head_dim, hidden.dtype, hidden.device, n)
    inp = LoopInputs(hidden=hidden, position_ids=position_ids, start=0, key_starts=None, chunk=n,
                     write_index=torch.arange(n, device=hidden.device))
    kv_only(LayerOps(mb, lb, kv, Rope(mb, position_ids, hidden, single_block=True), None), inp, 0, n)
    return kv.k_buf, kv.v_buf


def block(layer: LayerOps, inp: LoopInputs, r0: int, r1: int) -> None:
    """The whole layer on rows [r0, r1): attention (K, V into the cache), MLP, residual in place."""
    lb = layer.lb
    x = inp.hidden[:, r0:r1]
    q, k, v = layer.qkv(layer.norm(x, lb.input_norm), want_q=True)
    layer.rotate_and_write(q, k, v, r0, r1, inp.write_index[r0:r1])
    q_start = inp.start + r0
    lo = first_key(q_start, lb.window)  # a ring (sliding-window layer) holds only the window
    keys, values = layer.kv.band(lo, q_start + x.shape[1])
    x.add_(layer.finish(x, block_attention(q.transpose(1, 2), keys, values, q_start, inp.key_starts,
                                           lb.window, lb.scale, key_offset=lo, sinks=lb.sinks)))


def _layer_chunks(inp: LoopInputs, n_layers: int) -> list[int]:
    if inp.chunks is None:
        return [inp.chunk] * n_layers
    if len(inp.chunks) != n_layers or min(inp.chunks) != inp.chunk or any(
            not isinstance(c, int) or c < 1 for c in inp.chunks):
        raise ValueError(f"chunks must give each of the {n_layers} layers a chunk >= 1, the smallest equal to "
                         f"chunk ({inp.chunk}); got {inp.chunks}")
    return list(inp.chunks)


def cross_to(inp: LoopInputs, device: torch.device) -> None:
    """The residual stream and the positions go to the next layer's device."""
    inp.hidden = layer_mod.to_layer_device(inp.hidden, device)
    inp.position_ids = inp.position_ids.to(device)
    if inp.write_index is not None:
        inp.write_index = inp.write_index.to(device)


def run_layers(mb: ModelBinding, cache: ChunkKVCache, inp: LoopInputs) -> torch.Tensor:
    """Run every decoder layer over inp.hidden in place; afterwards each cache layer holds start + S
    positions. Rows of the last layer before ``last_rows_from`` are left stale (only their K, V count).
    Layer li runs in chunks of ``inp.chunks[li]`` rows when a schedule is given (chunking is exact).
    If anything raises, the cache keeps its previous length and contents: positions written past it are
    ignored, and a ring's held positions, which a prompt longer than its room writes over, are put back.
    Each layer runs on its own device (its KV and work buffers there too); returns the residual
    stream, which ends on the last layer's device (inp.hidden follows it)."""
    devices = mb.devices.layers
    if devices[0] != inp.hidden.device:
        cross_to(inp, devices[0])
    here = devices[0]
    hidden = inp.hidden
    b, s, _ = hidden.shape
    chunks = _layer_chunks(inp, len(mb.layers))
    rope = Rope(mb, inp.position_ids, hidden, single_block=s <= inp.chunk)
    inp.write_index = torch.arange(inp.start, inp.start + s, device=hidden.device)
    end = inp.start + s
    headroom = PREFILL_HEADROOM if s > 1 else 0
    last = len(mb.layers) - 1

    def shape_of(li: int):
        return b, mb.layers[li].n_kv, mb.layers[li].head_dim, hidden.dtype

    def n_chunks(rows: int, chunk: int) -> int:
        return -(-rows // chunk)

    streamer = LayerStreamer.for_call(cache, shape_of, inp.start, end, headroom)

    lf = inp.last_rows_from
    total = sum(n_chunks(s, c) for c in chunks[:-1]) + n_chunks(lf, chunks[-1]) + n_chunks(s - lf, chunks[-1])
    done = 0
    act_buf, act_rows, layer = None, 0, None
    held = {}  # ring layers' positions this call may write over: given back if it fails
    failed = True
    try:
        for li, lb in enumerate(mb.layers):
            chunk = chunks[li]
            if act_buf is not None and act_rows != b * min(chunk, s):
                act_buf = layer = None  # the schedule stepped down: free the larger buffer before this layer's KV
            if inp.hidden_states is not None:
                inp.hidden_states.append(hidden.clone())
            if devices[li] != here:
                here = devices[li]
                cross_to(inp, here)
                hidden = inp.hidden
                rope = Rope(mb, inp.position_ids, hidden, single_block=s <= inp.chunk)
                act_buf = layer = None  # the work buffer lives on the layer's device
            streamed = streamer is not None and streamer.is_streamed(li)
            if streamed:
                kv = streamer.begin(li)
            else:
                kv = cache.layers[li]
                if isinstance(kv, RingKVLayer):
                    held[li] = kv.save_held(s)
                kv.reserve(b, lb.n_kv, lb.head_dim, hidden.dtype, hidden.device, end, headroom, new_tokens=min(chunk, s))
            if act_buf is None:
                act_rows = b * min(chunk, s)
                act_buf = act_buffer(mb, hidden, act_rows)
            layer = LayerOps(mb, lb, kv, rope, act_buf)
            first = lf if li == last else 0
            steps = [(functools.partial(kv_only, layer, inp), r0, min(r0 + chunk, first)) for r0 in range(0, first, chunk)]
            steps += [(functools.partial(block, layer, inp), r0, min(r0 + chunk, s)) for r0 in range(first, s, chunk)]
            with mb.devices.onloaded(li):  # accelerate-offloaded weights: loaded once for all chunks
                for fn, r0, r1 in steps:
                    fn(r0, r1)
                    if inp.progress is not None:
                        done += 1
                        inp.progress(done, total)
            if streamed:
                streamer.finish(li)
            elif s > STEP_TOKENS and isinstance(kv, RingKVLayer):
                kv.shrink(end)  # after a prompt a ring keeps only its window (new chunks grow it again)
        failed = False
    finally:
        if streamer is not None:
            streamer.close(failed)
        if failed:
            for li, saved in held.items():
                if saved is not None:
                    cache.layers[li].restore_held(saved)
    for layer in cache.layers:
        layer.length = end
    return inp.hidden
