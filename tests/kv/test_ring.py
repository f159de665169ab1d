"""Sliding-window layers as rings (kv/ring.py): sizes, logical order across the wrap, growth and shrink,
and the ring contract the decode-attention kernels read (a pure-PyTorch stand-in here)."""
from __future__ import annotations

import pytest
import torch

from chunkinfer.kv.cache import ChunkKVCache
from chunkinfer.kv.ring import STEP_TOKENS, RingKVLayer, held_capacity, ring_capacity
from chunkinfer.ops import reference


def _filled(window: int, n: int, new_tokens: int, seed: int = 0):
    """A ring written one call of ``new_tokens`` at a time up to n positions, and the same K, V in full."""
    g = torch.Generator().manual_seed(seed)
    full_k, full_v = torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g)
    ring = RingKVLayer(window)
    for p0 in range(0, n, new_tokens):
        p1 = min(p0 + new_tokens, n)
        ring.reserve(2, 3, 8, torch.float32, torch.device("cpu"), p1, new_tokens=p1 - p0)
        ring.write_at(torch.arange(p0, p1), full_k[:, :, p0:p1], full_v[:, :, p0:p1])
        ring.length = p1
    return ring, full_k, full_v


def test_sizes():
    # a step of any length up to STEP_TOKENS keeps one room: the same slots for every step's length
    room = 15 + STEP_TOKENS
    assert ring_capacity(16, 400, 1) == room == ring_capacity(16, 400, 50) and ring_capacity(16, 10, 1) == 10
    assert ring_capacity(16, 4000, 500) == 15 + 500 and ring_capacity(16, 400, 500) == 400  # a prompt chunk
    assert held_capacity(16, 400) == 15 and held_capacity(16, 7) == 7


@pytest.mark.parametrize("new_tokens", [1, 5, 37])
def test_band_is_logical_order_across_the_wrap(new_tokens):
    ring, full_k, full_v = _filled(16, 203, new_tokens)
    assert ring.capacity <= 15 + STEP_TOKENS
    for lo in (203 - 15, 203 - 9):
        k, v = ring.band(lo, 203)
        assert torch.equal(k, full_k[:, :, lo:203]) and torch.equal(v, full_v[:, :, lo:203])
    assert torch.equal(ring.keys, full_k[:, :, 203 - 15:])  # what transformers sees: the last window - 1


def test_shrink_keeps_the_window_and_growth_remaps():
    ring, full_k, _ = _filled(16, 100, 40)
    ring.shrink(100)
    assert ring.capacity == 15 and torch.equal(ring.band(85, 100)[0], full_k[:, :, 85:100])
    ring.reserve(2, 3, 8, torch.float32, torch.device("cpu"), 101, new_tokens=1)  # the next step: the step room
    assert ring.capacity == 15 + STEP_TOKENS and torch.equal(ring.band(85, 100)[0], full_k[:, :, 85:100])
    with pytest.raises(ValueError, match="exceed"):
        ring.band(100 - ring.capacity - 1, 100)


def test_short_sequence_grows_geometrically_up_to_the_window():
    ring, full_k, _ = _filled(64, 20, 20)
    assert ring.capacity == 20  # no wrap: every position at itself
    caps = []
    for n in range(21, 80):
        ring.reserve(2, 3, 8, torch.float32, torch.device("cpu"), n, new_tokens=1)
        caps.append(ring.capacity)
    assert 79 <= max(caps) <= 63 + STEP_TOKENS  # every position held (no wrap yet), never past the room
    assert len(set(caps)) < 10 and torch.equal(ring.band(0, 20)[0], full_k[:, :, :20])


def ring_decode_attention(q, k_ring, v_ring, seq_lens, starts, scale, window):
    """The contract the decode kernels implement with window > 0: query t of sequence b at position
    p = seq_lens[b] - T + t sees keys j in [starts[b], p] with j > p - window, the key at j living at
    slot j % capacity. Plain PyTorch, float64."""
    b_, hq, t_, d = q.shape
    cap, g = k_ring.shape[2], hq // k_ring.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(b_):
        for t in range(t_):
            p = int(seq_lens[b]) - t_ + t
            keys = torch.arange(max(int(starts[b]), p - window + 1), p + 1)
            k = k_ring[b][:, keys % cap].double().repeat_interleave(g, 0)
            v = v_ring[b][:, keys % cap].double().repeat_interleave(g, 0)
            s = torch.einsum("hd,hnd->hn", q[b, :, t].double(), k) * scale
            out[b, :, t] = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), v)
    return out


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_ring_contract_matches_full_cache_decode(new_tokens):
    window, n = 16, 77
    ring, full_k, full_v = _filled(window, n, new_tokens)
    assert ring.capacity >= window - 1 + new_tokens
    q = torch.randn(2, 6, new_tokens, 8)
    lens, starts = torch.tensor([n, n]), torch.tensor([0, 70])
    ours = ring_decode_attention(q, ring.k_buf, ring.v_buf, lens, starts, 0.3, window)
    ref, _ = reference.decode_attention(q.double(), full_k.double(), full_v.double(), lens, starts, 0.3, window)
    assert (ours - ref).abs().max() < 1e-12


def test_cache_builds_rings_for_windowed_layers_only():
    cache = ChunkKVCache(3, windows=[16, None, 16])
    assert [type(layer).__name__ for layer in cache.layers] == ["RingKVLayer", "ChunkKVLayer", "RingKVLayer"]
    assert cache.layers[0].is_sliding and not cache.layers[1].is_sliding


def test_stock_update_returns_window_and_new_and_mask_sizes():
    ring, full_k, _ = _filled(16, 50, 50)
    ring.shrink(50)
    new_k = torch.randn(2, 3, 4, 8)
    keys, _ = ring.update(new_k, new_k.clone())
    assert torch.equal(keys, torch.cat([full_k[:, :, 35:50], new_k], 2)) and ring.length == 54
    assert ring.get_mask_sizes(1) == (16, 39)
