"""The cache on its own: the capacity rule the planner shares, crop as transformers means it, a stock
DynamicCache adopted in place, batch reordering with its padding, and placement on the host."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from chunkinfer.kv.cache import ChunkKVCache
from chunkinfer.kv.device_layer import ALIGN, GROWTH, PREFILL_HEADROOM, ChunkKVLayer, capacity_for
from chunkinfer.planner.memory import decode_growth, kv_capacity


def test_capacity_rule_is_the_planners():
    assert capacity_for(0, 1000, PREFILL_HEADROOM) == -(-(1000 + PREFILL_HEADROOM) // ALIGN) * ALIGN
    assert capacity_for(4096, 4000, 0) == 4096  # fits: unchanged
    assert capacity_for(4096, 4097, 0) == int(4096 * GROWTH) // ALIGN * ALIGN  # a step past it: geometric
    assert capacity_for(4096, 9000, 100) == -(-9100 // ALIGN) * ALIGN  # a long append: what it needs
    layer = ChunkKVLayer()
    layer.reserve(1, 2, 8, torch.float32, torch.device("meta"), 1000, PREFILL_HEADROOM)
    caps = [layer.k_buf.shape[2]]
    for end in range(1001, 6000):
        layer.reserve(1, 2, 8, torch.float32, torch.device("meta"), end)
        caps.append(layer.k_buf.shape[2])
    assert (caps[-1], sorted(set(caps))[-2]) == kv_capacity(1000, 4999)  # the planner's prediction
    assert decode_growth(caps[0], 5999) == kv_capacity(1000, 4999)


def _filled(n_layers=2, length=10, batch=3):
    cache = ChunkKVCache(n_layers)
    for layer in cache.layers:
        layer.reserve(batch, 2, 4, torch.float32, torch.device("cpu"), length)
        layer.k_buf[:, :, :length] = torch.arange(batch, dtype=torch.float32)[:, None, None, None]
        layer.length = length
    return cache


@pytest.mark.parametrize("n", [0, -3, -50])
def test_crop_like_dynamic_cache(n):
    ours, ref = _filled(), DynamicCache()
    for i in range(2):
        ref.update(torch.zeros(3, 2, 10, 4), torch.zeros(3, 2, 10, 4), i)
    ours.crop(n)
    ref.crop(n)
    assert ours.get_seq_length() == ref.get_seq_length()


def test_positive_crop_raises_or_keeps_as_transformers_does():
    layer = DynamicLayer()
    layer.keys = layer.values = torch.zeros(1, 1, 10, 1)
    layer.is_initialized = True
    ours = _filled()
    try:
        layer.crop(4)
    except ValueError as exc:
        with pytest.raises(ValueError, match="positive"):
            ours.crop(4)
        assert ours.get_seq_length() == 10 and "positive" in str(exc)
    else:
        ours.crop(4)
        assert ours.get_seq_length() == layer.keys.shape[2] == 4


def test_adopt_in_place_keeps_the_object_and_its_k_v():
    dc = DynamicCache()
    k = torch.randn(2, 2, 7, 4)
    for i in range(3):
        dc.update(k + i, k - i, i)
    same = ChunkKVCache.adopt_in_place(dc, 3)
    assert same is dc and isinstance(dc, ChunkKVCache) and isinstance(dc, DynamicCache)
    assert dc.get_seq_length() == 7 and torch.equal(dc.layers[2].keys, k + 2)
    empty = DynamicCache()
    assert ChunkKVCache.adopt_in_place(empty, 3).get_seq_length() == 0 and len(empty.layers) == 3


def test_adopt_refuses_a_cache_that_cannot_be_continued_and_leaves_it():
    dc = DynamicCache()
    dc.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    dc.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 1)  # a layer that dropped positions
    with pytest.raises(ValueError, match="cannot continue"):
        ChunkKVCache.adopt_in_place(dc, 2)
    assert type(dc) is DynamicCache and dc.get_seq_length(1) == 3
    with pytest.raises(ValueError, match="has 2 layers, the model has 4"):
        ChunkKVCache.adopt_in_place(dc, 4)


def test_batch_reordering_moves_the_padding_with_the_rows():
    cache = _filled()
    cache.key_starts = [0, 4, 2]
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert cache.key_starts == [4, 4, 0] and torch.equal(cache.layers[0].k_buf[:, 0, 0, 0], torch.tensor([1., 1., 0.]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.key_starts == [4, 0]
    cache.batch_repeat_interleave(2)
    assert cache.key_starts == [4, 4, 0, 0] and cache.batch_size_held() == 4


def test_host_placement_moves_the_trailing_layers():
    pytest.importorskip("chunkinfer.kv.transfer").require()
    from chunkinfer.kv.offload import HostKV, HostKVLayer, move_to_host

    cache = _filled(n_layers=3)
    cache.host = HostKV(torch.device("cpu"))
    before = cache.layers[2].k_buf[:, :, :10].clone()
    move_to_host(cache, 1)
    assert isinstance(cache.layers[0], ChunkKVLayer)
    assert all(isinstance(layer, HostKVLayer) for layer in cache.layers[1:])
    assert cache.streamed_layers() == [1, 2] and torch.equal(cache.layers[2].keys, before)
    assert cache.host_kv_bytes() > 0 and cache.device_kv()[0] == cache.layers[0].nbytes()
