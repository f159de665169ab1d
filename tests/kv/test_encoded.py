"""kv/encoded.py: a host layer's K or V held by the codec, written and read the way the layer loop does
(a prompt, its continuation, single-position steps re-encoding the last block, pieces), bit for bit,
with every 16-bit pattern among the values (escapes, spills, NaN, inf, denormals)."""
from __future__ import annotations

import pytest
import torch

import chunkinfer.kv.transfer
from chunkinfer import ops
from chunkinfer.kv import encoded
from chunkinfer.kv.encoded import EncodedKV, KVCompression, calibrated, parse_kv_compression
from chunkinfer.kv.offload import HostKV

from ..conftest import DEVICES
from ..ops.test_kv_codec import bits, kv_like, random_words, specials

pytestmark = pytest.mark.skipif(not chunkinfer.kv.transfer.available() or not ops.has_kernel("kv_encode_out", "CPU"),
                                reason="the compiled extension is not loaded")


def _values(b: int, h: int, n: int, d: int, dtype, gen) -> torch.Tensor:
    """K-like rows with a stretch of arbitrary 16-bit words (mostly escapes: those blocks spill) and
    one of NaN / inf / denormals."""
    x = kv_like((b, h, n, d), dtype, gen)
    x[:, :, 300:340] = random_words((b, h, 40, d), dtype, gen)
    x[:, :, 500:530] = specials((b, h, 30, d), dtype)
    return x


def _expanded(store: EncodedKV, like: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    dst = torch.full_like(like, float("nan"))  # poisoned: what expand does not write stays NaN
    store.expand(dst, lo, n)
    return dst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prompt_continuation_and_steps_round_trip(device, dtype, gen, monkeypatch):
    monkeypatch.setattr(encoded, "PIECE_POSITIONS", 64)  # several pieces per store
    host = HostKV(torch.device(device))
    b, h, cap, d = 2, 3, 1024, 24
    x = _values(b, h, cap, d, dtype, gen).to(device)
    store = calibrated(host, x, 200, KVCompression())  # the table of benign rows: the later ones escape
    store.reserve(b, h, cap, 0)
    ends = [200, 700] + list(range(701, 720))  # a prompt, a continuation, steps (the last block again)
    start = 0
    for end in ends:
        store.store(x, start, end)
        start = end
        for lo in (0, 32, 256):
            got = _expanded(store, x, lo, end)
            assert torch.equal(bits(got[:, :, lo:end]).cpu(), bits(x[:, :, lo:end]).cpu()), (end, lo)
            assert got[:, :, :lo].isnan().all() and got[:, :, end:].isnan().all()
        assert torch.equal(bits(store.decoded(end)), bits(x[:, :, :end].cpu()))
    stats = store.stats(ends[-1])
    assert stats.spilled_blocks > 0, "the arbitrary words must spill"
    assert stats.lost_blocks == 0
    # a store that writes again every block the last one wrote takes the pool back: dead units stay
    # bounded by one per stream for each time the first block moved on
    assert stats.spilled_blocks <= store.pool_used <= stats.spilled_blocks + len(ends) * b * h
    assert store.nbytes() == store.blocks.numel() + store.pool.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_reserve_keeps_the_blocks_it_is_asked_to(device, gen):
    host = HostKV(torch.device(device))
    x = kv_like((1, 2, 512, 16), torch.bfloat16, gen).to(device)
    store = calibrated(host, x, 256, KVCompression())
    store.reserve(1, 2, 256, 0)
    store.store(x, 0, 250)
    store.reserve(1, 2, 512, 250)  # grows: the blocks of positions [0, 250) come along
    assert store.capacity == 512
    store.store(x, 250, 512)
    assert torch.equal(bits(store.decoded(512)), bits(x.cpu()))


def test_expand_refuses_a_start_inside_a_block(gen):
    host = HostKV(torch.device("cpu"))
    x = kv_like((1, 1, 64, 8), torch.bfloat16, gen)
    store = calibrated(host, x, 64, KVCompression())
    store.reserve(1, 1, 64, 0)
    store.store(x, 0, 64)
    with pytest.raises(ValueError, match="multiple of the block rows 16"):
        store.expand(torch.empty_like(x), 8, 64)


def test_settings_are_checked():
    assert parse_kv_compression(None) is None and parse_kv_compression(False) is None
    assert parse_kv_compression("lossless") == KVCompression()
    given = KVCompression(escape_capacity=0)
    assert parse_kv_compression(given) is given
    for bad in ("zstd", True, 1):
        with pytest.raises((TypeError, ValueError), match="kv_compression"):
            parse_kv_compression(bad)
    with pytest.raises(ValueError, match="block_rows"):
        KVCompression(block_rows=24)
    with pytest.raises(ValueError, match="margin"):
        KVCompression(margin=-0.1)
    assert KVCompression(margin=0.25).planned_ratio(1.25) == 1.0
    assert KVCompression(margin=0.125).planned_ratio(0.9) == 0.8  # data that codes badly is planned as it is


def test_a_plan_places_layers_raw_encoded_on_the_device_and_on_the_host():
    """placement.place with a plan's encoded_device_layers / host_layers: the tiers it asks for, rings
    left resident in between, one staging slot while layers are encoded on the device."""
    from types import SimpleNamespace

    from chunkinfer.kv.cache import ChunkKVCache
    from chunkinfer.kv.device_layer import ChunkKVLayer
    from chunkinfer.kv.offload import EncodedKVLayer
    from chunkinfer.kv.placement import OffloadSettings, place

    host = HostKV(torch.device("cpu"), compression=KVCompression())
    cache = ChunkKVCache(6, host, windows=[None, None, 64, None, None, None])  # layer 2 slides
    place(cache, OffloadSettings(resident_layers=None),
          SimpleNamespace(encoded_device_layers=[1, 3], host_layers=[4, 5]))
    def kinds():
        return [("raw" if isinstance(x, ChunkKVLayer) else "device" if not x.cpu_readable else "host")
                for x in cache.layers]

    assert kinds() == ["raw", "device", "raw", "device", "host", "host"]
    assert all(isinstance(x, EncodedKVLayer) for x in cache.layers[3:]) and len(cache.staging.slots) == 1
    place(cache, OffloadSettings(resident_layers=None), SimpleNamespace(encoded_device_layers=[], host_layers=[4, 5]))
    assert len(cache.staging.slots) == 2  # a later plan without device-encoded layers: two slots again
    assert kinds() == ["raw", "device", "raw", "device", "host", "host"]  # a streamed layer stays where it is
