"""A sliding-window layer's K, V as a ring buffer: bounded by its window, whatever the sequence length.

A query at position p of a layer with window W sees keys (p - W, p]. After a call, only the last W - 1
positions can be seen by any later query; during a call of T new tokens per attention step (the chunk
of a prompt, 1 for a decode step) the ring needs W - 1 + T. Logical position p lives at slot
p % capacity (the decode-attention kernels read it there: valid while capacity >= W - 1 + T, or while
every position fits without wrapping). ``length`` stays the logical length, as transformers counts it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .device_layer import GROWTH, STEP_TOKENS, ChunkKVLayer
# Whether ops.decode_attention reads rings (position p at slot p % capacity, lengths beyond the capacity).
# Until it does, steps attend sliding-window layers eagerly over the ring's band (loop/step.py), exactly,
# and such models take no CUDA graph (loop/decode_graph.py).
RING_DECODE = True


def ring_room(window: int, new_tokens: int) -> int:
    """Slots a ring holds when calls write ``new_tokens`` at a time: W - 1 + T, with T = STEP_TOKENS for
    every step, so that a ring's slots (and the attention's pieces over them) are the same for a
    one-token step and a speculative verification: each row then computes alike (loop/step.py)."""
    return window - 1 + (STEP_TOKENS if new_tokens <= STEP_TOKENS else new_tokens)


def ring_capacity(window: int, end: int, new_tokens: int) -> int:
    """Slots a ring needs to hold ``end`` positions when calls write ``new_tokens`` at a time: every
    position while they fit in its room, else its room."""
    return min(end, ring_room(window, new_tokens))


def held_capacity(window: int, end: int) -> int:
    """Slots a ring keeps between calls: the last W - 1 positions (every one while fewer)."""
    return min(end, window - 1)


@dataclass
class HeldPositions:
    """A copy of a ring's held positions [start, start + n) in host memory (RingKVLayer.save_held)."""

    start: int
    k: torch.Tensor  # [B, Hkv, n, D]
    v: torch.Tensor


class RingKVLayer(ChunkKVLayer):
    """K, V buffers [B, Hkv, capacity, D] of a sliding-window layer; position p at slot p % capacity."""

    is_sliding = True

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    @property
    def capacity(self) -> int:
        return 0 if self.k_buf is None else self.k_buf.shape[2]

    def first_held(self, end: int | None = None) -> int:
        """The first position a later query can see once ``end`` (default: length) positions are written."""
        end = self.length if end is None else end
        return max(0, end - (self.window - 1))

    def reserve(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                needed: int, headroom: int = 0, new_tokens: int = 1) -> None:
        """Room for positions up to ``needed`` written ``new_tokens`` at a time (``headroom`` does not
        apply: a ring never holds more than its window needs). Reallocates only when short, growing
        geometrically while the sequence is shorter than the window."""
        need = ring_capacity(self.window, needed, new_tokens)
        cap = self.capacity
        if cap >= need:
            self.dtype, self.device, self.is_initialized = dtype, device, True
            return
        new_cap = need if not cap else min(ring_room(self.window, new_tokens), max(need, int(cap * GROWTH)))
        self._resize(batch, n_kv, head_dim, dtype, device, new_cap)

    def shrink(self, end: int) -> None:
        """After a prompt of ``end`` positions: keep only the slots later calls can read."""
        keep = held_capacity(self.window, end)
        if self.k_buf is not None and self.capacity > keep:
            b, h, _, d = self.k_buf.shape
            self._resize(b, h, d, self.k_buf.dtype, self.k_buf.device, keep, end)

    def _resize(self, batch, n_kv, head_dim, dtype, device, new_cap: int, end: int | None = None) -> None:
        end = self.length if end is None else end
        k = torch.empty(batch, n_kv, new_cap, head_dim, dtype=dtype, device=device)
        v = torch.empty_like(k)
        if self.k_buf is not None and end:
            lo = max(self.first_held(end), end - min(new_cap, self.capacity))
            pos = torch.arange(lo, end, device=device)
            k.index_copy_(2, pos % new_cap, self.k_buf.index_select(2, pos % self.capacity))
            v.index_copy_(2, pos % new_cap, self.v_buf.index_select(2, pos % self.capacity))
        self.k_buf, self.v_buf = k, v
        self.dtype, self.device, self.is_initialized = dtype, device, True

    def slots(self, index: torch.Tensor) -> torch.Tensor:
        return torch.remainder(index, self.capacity)

    def band(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [lo, hi) in order (views unless the range wraps around the ring)."""
        cap, n = self.capacity, hi - lo
        if n > cap:
            raise ValueError(f"positions [{lo}, {hi}) exceed the ring's {cap} slots")
        s0 = lo % cap
        if s0 + n <= cap:
            return self.k_buf[:, :, s0:s0 + n], self.v_buf[:, :, s0:s0 + n]
        tail = n - (cap - s0)
        return (torch.cat([self.k_buf[:, :, s0:], self.k_buf[:, :, :tail]], dim=2),
                torch.cat([self.v_buf[:, :, s0:], self.v_buf[:, :, :tail]], dim=2))

    def position_limit(self, new_tokens: int = 1) -> float:
        """Positions a step of ``new_tokens`` can reach without growing: unbounded once the ring wraps safely."""
        return float("inf") if self.capacity >= self.window - 1 + new_tokens else self.capacity

    def save_held(self, new_tokens: int) -> HeldPositions | None:
        """A copy of the positions later calls can read, in host memory, before a call writes
        ``new_tokens``: a prompt longer than the ring's room writes over their slots before its call
        ends, and a call that fails gives them back (restore_held), so the cache stays as it was. None
        when the ring holds none, or when the writes fit beside them (a step: ring_room keeps
        STEP_TOKENS slots for it)."""
        lo = self.first_held()
        if self.k_buf is None or lo >= self.length or new_tokens <= STEP_TOKENS:
            return None
        k, v = self.band(lo, self.length)
        pinned = k.is_cuda  # an asynchronous copy, ordered before the call's writes on the stream

        def host(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned).copy_(t, non_blocking=pinned)
        return HeldPositions(lo, host(k), host(v))

    def restore_held(self, held: HeldPositions) -> None:
        """Write back what save_held copied, at the same positions (the buffers may have been regrown)."""
        n = held.k.shape[2]
        device = self.k_buf.device
        self.write_at(torch.arange(held.start, held.start + n, device=device), held.k.to(device), held.v.to(device))

    # ---- transformers' CacheLayerMixin (a stock forward on this cache sees DynamicSlidingWindowLayer's view) ----
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.k_buf is None else self.band(self.first_held(), self.length)[0]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.v_buf is None else self.band(self.first_held(), self.length)[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return min(self.length, self.window - 1) + query_length, self.first_held()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b, h, n, d = key_states.shape
        end = self.length + n
        self.reserve(b, h, d, key_states.dtype, key_states.device, end, new_tokens=n)
        held_k, held_v = self.band(self.first_held(), self.length)
        keys = torch.cat([held_k, key_states], dim=2)  # copies before the write reuses no held slot anyway
        values = torch.cat([held_v, value_states], dim=2)
        self.write_at(torch.arange(self.length, end, device=key_states.device), key_states, value_states)
        self.length = end
        return keys, values

    def write_at(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, Hkv, n, D] at logical ``positions`` [n]."""
        slots = self.slots(positions)
        self.k_buf.index_copy_(2, slots, k.to(self.k_buf.dtype))
        self.v_buf.index_copy_(2, slots, v.to(self.v_buf.dtype))

    def crop_to(self, length: int) -> None:
        new = min(self.length, length)
        if new < self.length and self.first_held(new) < self.length - self.capacity:
            raise ValueError(f"cannot crop a sliding-window layer (window {self.window}) back to {new} positions: "
                             "the ring no longer holds the keys that length needs")
        self.length = new
