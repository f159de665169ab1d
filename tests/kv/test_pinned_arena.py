"""PinnedArena: exact-size aligned regions, reuse and coalescing, background growth, lifetimes.

The bookkeeping runs on plain host memory (pinned=False) everywhere; the page-locked variant only
where a GPU is.
"""
from __future__ import annotations

import gc
import random
import threading

import pytest
import torch

import chunkinfer
from chunkinfer.kv.transfer import PinnedArena
from tests.conftest import CUDA

MiB = 1 << 20
ALIGN = 256

def rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def nbytes(shape, dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def fill_random(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Writes fresh random values into t (never zeros) and returns a private copy of them."""
    if t.dtype.is_floating_point:
        src = torch.randn(t.shape, generator=gen).to(t.dtype)
    else:
        src = torch.randint(1, 100, t.shape, generator=gen).to(t.dtype)
    t.copy_(src)
    return src.clone()


def test_exact_sizes_and_alignment(gen):
    arena = PinnedArena(4 * MiB, pinned=False)
    assert arena.bytes_used == 0 and arena.bytes_reserved == 0 and arena.slab_count == 0
    assert not arena.pinned and arena.slab_bytes == 4 * MiB
    cases = [([3, 5], torch.float32), ([7], torch.bfloat16), ([1, 1, 1], torch.int8), ([2, 3, 129], torch.float16),
             ([1000], torch.float64), ([64, 4], torch.float32), ([13, 1], torch.uint8)]
    tensors, expected = [], 0
    for shape, dtype in cases:
        t = arena.allocate(shape, dtype)
        assert t.shape == tuple(shape) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
        assert t.data_ptr() % ALIGN == 0, f"{shape} {dtype} at {t.data_ptr():#x}"
        expected += rounded(nbytes(shape, dtype))
        assert arena.bytes_used == expected
        tensors.append((t, fill_random(t, gen)))
    assert arena.slab_count == 1 and arena.bytes_reserved == 4 * MiB
    for t, want in tensors:  # no region overlaps another
        assert torch.equal(t, want)
    del tensors, t
    assert arena.bytes_used == 0


def test_zero_elements_and_bad_arguments():
    arena = PinnedArena(2 * MiB, pinned=False)
    t = arena.allocate([4, 0, 3], torch.float32)
    assert t.shape == (4, 0, 3) and t.numel() == 0
    assert arena.bytes_used == 0 and arena.slab_count == 0
    with pytest.raises(ValueError, match="negative size"):
        arena.allocate([2, -1], torch.float32)
    with pytest.raises(ValueError, match="overflows"):
        arena.allocate([1 << 40, 1 << 40], torch.float32)
    with pytest.raises(ValueError, match="slab_bytes must be positive"):
        PinnedArena(0, pinned=False)
    with pytest.raises(ValueError, match="total_bytes"):
        arena.grow_async(-1)
    arena.wait_grown()  # nothing in flight: returns at once


def test_slab_bytes_round_up_to_2mib():
    assert PinnedArena(1, pinned=False).slab_bytes == 2 * MiB
    assert PinnedArena(3 * MiB, pinned=False).slab_bytes == 4 * MiB


def test_freed_region_is_reused(gen):
    arena = PinnedArena(4 * MiB, pinned=False)
    keep = arena.allocate([1000], torch.float32)
    a = arena.allocate([300, 7], torch.float32)
    ptr, reserved = a.data_ptr(), arena.bytes_reserved
    del a
    assert arena.bytes_used == rounded(4000)
    b = arena.allocate([300, 7], torch.float32)
    assert b.data_ptr() == ptr and arena.bytes_reserved == reserved and arena.slab_count == 1
    want = fill_random(b, gen)
    assert torch.equal(b, want) and keep.shape == (1000,)


def test_freed_neighbours_coalesce():
    arena = PinnedArena(4 * MiB, pinned=False)
    a = arena.allocate([MiB], torch.uint8)
    b = arena.allocate([MiB], torch.uint8)
    c = arena.allocate([2 * MiB], torch.uint8)  # the slab is now full
    assert arena.slab_count == 1 and arena.bytes_used == 4 * MiB
    start = a.data_ptr()
    assert b.data_ptr() == start + MiB
    del a, b
    ab = arena.allocate([2 * MiB], torch.uint8)  # fits only if the two freed ranges merged
    assert arena.slab_count == 1 and arena.bytes_reserved == 4 * MiB
    assert ab.data_ptr() == start
    del c, ab
    # Everything merged back into one range: the whole slab is one region again.
    whole = arena.allocate([4 * MiB], torch.uint8)
    assert whole.data_ptr() == start and arena.slab_count == 1


def test_big_request_gets_its_own_exact_slab():
    arena = PinnedArena(4 * MiB, pinned=False)
    small = arena.allocate([16], torch.float32)
    assert arena.bytes_reserved == 4 * MiB
    big_bytes = 5 * MiB + 4
    big = arena.allocate([big_bytes], torch.uint8)
    assert arena.slab_count == 2
    assert arena.bytes_reserved == 4 * MiB + 6 * MiB  # its size rounded up to 2 MiB, not a whole slab more
    assert arena.bytes_used == rounded(64) + rounded(big_bytes)
    big.fill_(7)
    assert int(big[-1]) == 7
    del big
    assert arena.trim() == 6 * MiB
    assert arena.bytes_reserved == 4 * MiB and arena.slab_count == 1 and small.numel() == 16


def test_grow_async_reaches_the_target():
    arena = PinnedArena(4 * MiB, pinned=False)
    arena.grow_async(18 * MiB)
    arena.wait_grown()
    assert arena.bytes_reserved >= 18 * MiB
    assert arena.bytes_reserved == 20 * MiB and arena.slab_count == 5
    assert not arena.growing and arena.bytes_used == 0
    arena.grow_async(8 * MiB)  # already there: nothing to do
    arena.wait_grown()
    assert arena.bytes_reserved == 20 * MiB
    assert arena.pinning_seconds == (0.0, 0.0)  # nothing pinned


def test_allocate_during_growth_uses_the_grown_slabs(gen):
    arena = PinnedArena(2 * MiB, pinned=False)
    arena.grow_async(64 * MiB)
    n = MiB // 4 - 64  # two regions per 2 MiB slab: 40 of them need 40 of the 64 MiB
    tensors = [arena.allocate([n], torch.float32) for _ in range(40)]
    arena.wait_grown()
    # Growth was in flight the whole time, so allocate waited for its slabs instead of adding any.
    assert arena.bytes_reserved == 64 * MiB
    assert arena.bytes_used == 40 * rounded(4 * n)
    wants = [fill_random(t, gen) for t in tensors]
    for t, want in zip(tensors, wants):
        assert torch.equal(t, want)


def test_grow_failure_is_raised_by_wait_grown():
    # A 4 EiB slab exceeds any process's address space: the background allocation fails.
    arena = PinnedArena(1 << 62, pinned=False)
    arena.grow_async(1)  # growth aims at whole slabs: one
    with pytest.raises(RuntimeError, match=r"growing to 4611686018427387904 bytes stopped with 0 bytes reserved.*"
                                           r"allocating 4611686018427387904 bytes"):
        arena.wait_grown()
    arena.wait_grown()  # raised once
    assert arena.bytes_reserved == 0 and not arena.growing


def test_trim_frees_only_empty_slabs(gen):
    arena = PinnedArena(2 * MiB, pinned=False)
    first = [arena.allocate([MiB], torch.uint8) for _ in range(2)]  # fills slab 1
    second = [arena.allocate([MiB], torch.uint8) for _ in range(2)]  # fills slab 2
    assert arena.slab_count == 2
    want = fill_random(second[0], gen)
    assert arena.trim() == 0
    del first
    assert arena.trim() == 2 * MiB
    assert arena.slab_count == 1 and arena.bytes_reserved == 2 * MiB
    assert torch.equal(second[0], want)  # the live slab is untouched
    arena.grow_async(8 * MiB)
    arena.wait_grown()
    assert arena.trim() == 6 * MiB  # grown but unused slabs go too
    assert arena.bytes_reserved == 2 * MiB


def test_tensor_outlives_the_arena(gen):
    arena = PinnedArena(2 * MiB, pinned=False)
    t = arena.allocate([257, 3], torch.float32)
    u = arena.allocate([5000], torch.bfloat16)
    want = fill_random(t, gen)
    del arena
    gc.collect()
    assert torch.equal(t, want)
    want2, want_u = fill_random(t, gen), fill_random(u, gen)
    assert torch.equal(t, want2) and torch.equal(u, want_u)
    del t
    gc.collect()
    assert torch.equal(u, want_u)


def test_concurrent_allocate_and_free(gen):
    arena = PinnedArena(2 * MiB, pinned=False)
    seeds = [int(torch.randint(0, 2**31 - 1, (), generator=gen)) for _ in range(8)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        live = []
        try:
            for step in range(300):
                if live and rng.random() < 0.45:
                    t, want = live.pop(rng.randrange(len(live)))
                    if not torch.equal(t, want):
                        errors.append(f"seed {seed} step {step}: a region was overwritten by another thread")
                else:
                    t = arena.allocate([rng.randint(1, 40_000)], torch.float32)
                    if t.data_ptr() % ALIGN:
                        errors.append(f"seed {seed}: misaligned {t.data_ptr():#x}")
                    live.append((t, fill_random(t, g)))
            for t, want in live:
                if not torch.equal(t, want):
                    errors.append(f"seed {seed}: a region was overwritten by another thread")
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(f"seed {seed}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]
    assert arena.bytes_used == 0
    reserved = arena.bytes_reserved
    assert arena.trim() == reserved and arena.slab_count == 0


def test_pinned_needs_cuda_and_says_so():
    if CUDA:
        pytest.skip("a GPU is present: pinned memory is available")
    with pytest.raises(RuntimeError, match="pinned=False"):
        PinnedArena(2 * MiB)
    with pytest.raises(RuntimeError, match="pinned=False"):
        PinnedArena(2 * MiB, pinned=True, device=0)


def test_reexported_from_the_extension():
    assert chunkinfer.build_info()["compiled"]
    assert PinnedArena is chunkinfer.ops.library.extension.PinnedArena


# ---- page-locked memory (GPU machines) ----

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_pinned_allocate_is_page_locked(gen):
    arena = PinnedArena(4 * MiB, pinned=True, device=torch.cuda.current_device())
    assert arena.pinned and arena.device == torch.cuda.current_device()
    t = arena.allocate([3, 1000], torch.bfloat16)
    assert t.is_pinned() and t.data_ptr() % ALIGN == 0
    big = arena.allocate([5 * MiB], torch.uint8)  # its own slab, pinned too
    assert big.is_pinned() and arena.slab_count == 2
    want = fill_random(t, gen)
    assert torch.equal(t, want)
    # Pinned memory serves a real asynchronous copy.
    on_gpu = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), want)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_pinned_grow_async_then_allocate():
    arena = PinnedArena(8 * MiB, pinned=True, device=torch.cuda.current_device())
    arena.grow_async(64 * MiB)
    tensors = [arena.allocate([MiB], torch.uint8) for _ in range(20)]
    arena.wait_grown()
    assert arena.bytes_reserved == 64 * MiB and arena.slab_count == 8
    assert all(t.is_pinned() for t in tensors)
    # every slab starts on a 2 MiB boundary (so it can be backed by huge pages) and was timed
    assert all(t.data_ptr() % (2 * MiB) == 0 for t in tensors[::8])
    fault_in, register = arena.pinning_seconds
    assert fault_in > 0 and register > 0
    del tensors
    assert arena.trim() == 64 * MiB and arena.slab_count == 0


def test_missing_extension_raises_a_clear_error(monkeypatch):
    import importlib

    from chunkinfer.kv import transfer
    from chunkinfer.ops import library

    monkeypatch.setattr(library, "extension", None)
    monkeypatch.setattr(library, "LOAD_ERROR", "ImportError: no _C here")
    try:
        importlib.reload(transfer)
        with pytest.raises(RuntimeError, match="needs the compiled extension.*no _C here"):
            transfer.PinnedArena(2 * MiB, pinned=False)
        with pytest.raises(RuntimeError, match="needs the compiled extension"):
            transfer.KVTransferEngine(-1)
    finally:
        monkeypatch.undo()
        importlib.reload(transfer)
    assert transfer.PinnedArena is library.extension.PinnedArena
