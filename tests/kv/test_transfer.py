"""KVTransferEngine: position-range copies of [B, H, capacity, D] KV buffers.

The CPU engine (device=-1) runs everywhere and checks the range arithmetic and every validation;
the GPU tests check the stream ordering: copies follow the work queued on the current stream, and
wait(ticket) orders the current stream after a copy without a host sync.
"""
from __future__ import annotations

import pytest
import torch

import chunkinfer
from chunkinfer.kv.transfer import KVTransferEngine, PinnedArena
from tests.conftest import CUDA, poisoned, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nan_outside(t: torch.Tensor, p0: int, p1: int) -> bool:
    """Whether every position outside [p0, p1) of t is still NaN."""
    return bool(t[:, :, :p0].isnan().all()) and bool(t[:, :, p1:].isnan().all())


def kv_bytes(t: torch.Tensor, n: int) -> int:
    return t.shape[0] * t.shape[1] * n * t.shape[3] * t.element_size()


@pytest.fixture
def cpu_engine():
    return KVTransferEngine(device=-1)


# ---- the CPU engine ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["offload", "prefetch"])
def test_copies_exactly_the_range(cpu_engine, gen, dtype, direction):
    src = randn([2, 3, 50, 8], dtype, "cpu", gen)
    dst = poisoned([2, 3, 50, 8], dtype, "cpu")
    ticket = getattr(cpu_engine, direction)(src, dst, 7, 19)
    assert ticket == 1 and cpu_engine.done(ticket) and cpu_engine.pending == 0
    assert torch.equal(dst[:, :, 7:19], src[:, :, 7:19])
    assert nan_outside(dst, 7, 19)


@pytest.mark.parametrize("direction", ["offload", "prefetch"])
def test_dst_offset_and_different_capacities(cpu_engine, gen, direction):
    copy = getattr(cpu_engine, direction)
    src = randn([1, 4, 33, 16], torch.bfloat16, "cpu", gen)
    dst = poisoned([1, 4, 70, 16], torch.bfloat16, "cpu")
    copy(src, dst, 5, 30, dst_p0=41)
    assert torch.equal(dst[:, :, 41:66], src[:, :, 5:30]) and nan_outside(dst, 41, 66)
    # Back into a smaller buffer, to its start.
    back = poisoned([1, 4, 25, 16], torch.bfloat16, "cpu")
    copy(dst, back, 41, 66, dst_p0=0)
    assert torch.equal(back, src[:, :, 5:30])


@pytest.mark.parametrize("shape", [[1, 1, 9, 4], [3, 1, 9, 4], [1, 5, 9, 4], [2, 2, 9, 1], [2, 2, 1, 4]])
def test_single_row_and_unit_dims(cpu_engine, gen, shape):
    src = randn(shape, torch.float32, "cpu", gen)
    dst = poisoned(shape, torch.float32, "cpu")
    cap = shape[2]
    cpu_engine.offload(src, dst, 0, cap)
    assert torch.equal(dst, src)


def test_slices_along_capacity_are_accepted(cpu_engine, gen):
    big_src = randn([2, 3, 64, 8], torch.float32, "cpu", gen)
    big_dst = poisoned([2, 3, 40, 8], torch.float32, "cpu")
    src, dst = big_src[:, :, 10:30], big_dst[:, :, 5:35]  # row pitch larger than the view's capacity
    cpu_engine.prefetch(src, dst, 2, 17, dst_p0=11)
    assert torch.equal(dst[:, :, 11:26], src[:, :, 2:17])
    assert nan_outside(big_dst, 16, 31)


def test_empty_range_issues_a_complete_ticket(cpu_engine, gen):
    src = randn([2, 2, 8, 4], torch.float32, "cpu", gen)
    dst = poisoned([2, 2, 8, 4], torch.float32, "cpu")
    t = cpu_engine.offload(src, dst, 3, 3)
    assert cpu_engine.done(t) and bool(dst.isnan().all()) and cpu_engine.bytes_to_host == 0


def test_tickets_and_counters(cpu_engine, gen):
    src = randn([2, 3, 20, 8], torch.float16, "cpu", gen)
    dst = poisoned([2, 3, 20, 8], torch.float16, "cpu")
    assert cpu_engine.device == -1 and cpu_engine.last_ticket == 0
    t1 = cpu_engine.offload(src, dst, 0, 5)
    t2 = cpu_engine.prefetch(dst, src, 0, 5, 10)
    t3 = cpu_engine.offload(src, dst, 5, 12)
    assert (t1, t2, t3) == (1, 2, 3) and cpu_engine.last_ticket == 3
    assert cpu_engine.bytes_to_host == kv_bytes(src, 5) + kv_bytes(src, 7)
    assert cpu_engine.bytes_to_device == kv_bytes(src, 5)
    for t in (t1, t2, t3):
        assert cpu_engine.done(t)
        cpu_engine.wait(t)
        cpu_engine.synchronize(t)
    cpu_engine.synchronize()
    assert cpu_engine.pending == 0
    for bad in (0, 4, -2):
        with pytest.raises(ValueError, match=f"unknown ticket {bad}"):
            cpu_engine.done(bad)
    with pytest.raises(ValueError, match="unknown ticket -1"):
        cpu_engine.wait(-1)
    with pytest.raises(ValueError, match="unknown ticket 9"):
        cpu_engine.synchronize(9)


def _buffers(gen):
    return randn([2, 3, 16, 8], torch.float32, "cpu", gen), poisoned([2, 3, 16, 8], torch.float32, "cpu")


@pytest.mark.parametrize("direction,src_name,dst_name", [("offload", "src_gpu", "dst_host"),
                                                         ("prefetch", "src_host", "dst_gpu")])
def test_validation_errors_name_the_problem(cpu_engine, gen, direction, src_name, dst_name):
    copy = getattr(cpu_engine, direction)
    src, dst = _buffers(gen)
    cases = [
        (lambda: copy(src[0], dst, 0, 4), f"{src_name} must be a 4-D KV buffer.*got 3-D shape \\[3, 16, 8\\]"),
        (lambda: copy(src, dst.unsqueeze(0), 0, 4), f"{dst_name} must be a 4-D KV buffer.*5-D"),
        (lambda: copy(src, dst.half(), 0, 4), f"{src_name} has dtype Float but {dst_name} has dtype Half"),
        (lambda: copy(src, torch.empty(2, 4, 16, 8), 0, 4), "B, H and D .* must match"),
        (lambda: copy(src, torch.empty(2, 3, 16, 4), 0, 4), "shape \\[2, 3, 16, 4\\]"),
        (lambda: copy(src, dst, 5, 17), "runs past " + src_name + "'s capacity 16"),
        (lambda: copy(src, dst, 5, 2), "needs 0 <= p0 <= p1"),
        (lambda: copy(src, dst, -1, 2), "needs 0 <= p0 <= p1"),
        (lambda: copy(src, dst, 0, 8, 9), "runs past " + dst_name + "'s capacity 16"),
        (lambda: copy(src, dst, 0, 8, -3), "dst_p0 must be >= 0"),
        # positions not at stride D: a [B, cap, H, D] buffer seen as [B, H, cap, D]
        (lambda: copy(torch.randn(2, 16, 3, 8).transpose(1, 2), dst, 0, 4), f"{src_name} must be laid out"),
        # D not contiguous
        (lambda: copy(src, torch.empty(2, 3, 8, 16).transpose(2, 3), 0, 4), f"{dst_name} must be laid out"),
        # B and H swapped in memory
        (lambda: copy(torch.randn(3, 2, 16, 8).transpose(0, 1), dst, 0, 4), f"{src_name} must be laid out"),
        # rows overlapping (expanded over H)
        (lambda: copy(src, torch.empty(2, 1, 16, 8).expand(2, 3, 16, 8), 0, 4), f"{dst_name} must be laid out"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
    assert bool(dst.isnan().all()), "a rejected copy wrote into dst"
    assert cpu_engine.last_ticket == 0


def test_cpu_engine_refuses_other_devices(cpu_engine, gen):
    src, dst = _buffers(gen)
    meta = torch.empty(2, 3, 16, 8, device="meta")
    with pytest.raises(ValueError, match="src_gpu is on meta but this engine is a CPU engine"):
        cpu_engine.offload(meta, dst, 0, 4)
    with pytest.raises(ValueError, match="dst_host must be a CPU tensor, got one on meta"):
        cpu_engine.offload(src, meta, 0, 4)
    with pytest.raises(ValueError, match="src_host must be a CPU tensor"):
        cpu_engine.prefetch(meta, dst, 0, 4)


def test_engine_construction():
    with pytest.raises(ValueError, match="device must be a CUDA device index or -1"):
        KVTransferEngine(-2)
    if CUDA:
        dev = torch.cuda.current_device()
        assert KVTransferEngine(dev).device == dev
        return
    if chunkinfer.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="pass device=-1 for a CPU engine"):
            KVTransferEngine(0)
    else:
        assert KVTransferEngine(0).device == -1  # a CPU-only build has only the CPU engine


def test_cpu_engine_with_arena_buffers(cpu_engine, gen):
    arena = PinnedArena(2 * 1024 * 1024, pinned=False)
    host = arena.allocate([2, 4, 100, 16], torch.bfloat16)
    host.fill_(float("nan"))
    src = randn([2, 4, 64, 16], torch.bfloat16, "cpu", gen)
    cpu_engine.offload(src, host, 3, 60, 40)
    assert torch.equal(host[:, :, 40:97], src[:, :, 3:60]) and nan_outside(host, 40, 97)


# ---- the GPU engine ----

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")


def _sleep_ms(ms: float) -> None:
    """Queues a busy kernel of about `ms` on the current stream: work still running when the
    host issues the next call, so a copy not ordered after it would read or write too early."""
    torch.cuda._sleep(int(ms * 2_000_000))  # ~2 GHz cycles


@pytest.fixture
def gpu():
    dev = torch.cuda.current_device()
    return dev, KVTransferEngine(dev), PinnedArena(64 << 20, pinned=True, device=dev)


@cuda
@needs_gpu
def test_gpu_offload_follows_queued_writes(gpu, gen):
    dev, engine, arena = gpu
    buf = torch.full((2, 4, 256, 64), float("nan"), dtype=torch.float32, device=dev)
    values = randn([2, 4, 256, 64], torch.float32, dev, gen)
    host = arena.allocate([2, 4, 256, 64], torch.float32)
    host.fill_(float("nan"))
    torch.cuda.synchronize()
    _sleep_ms(50)
    buf.copy_(values)  # queued behind the sleep: not yet written when offload is called
    t = engine.offload(buf, host, 10, 200)
    engine.synchronize(t)
    assert engine.done(t)
    assert torch.equal(host[:, :, 10:200], values[:, :, 10:200].cpu())
    assert nan_outside(host, 10, 200)


@cuda
@needs_gpu
def test_gpu_prefetch_then_wait_orders_the_current_stream(gpu, gen):
    dev, engine, arena = gpu
    shape = [4, 8, 8192, 128]  # 128 MiB of fp32: a read not ordered after the copy would see NaN
    host = arena.allocate(shape, torch.float32)
    want = randn(shape, torch.float32, "cpu", gen)
    host.copy_(want)
    dst = torch.full(shape, float("nan"), dtype=torch.float32, device=dev)
    torch.cuda.synchronize()
    t = engine.prefetch(host, dst, 0, shape[2])
    engine.wait(t)  # no host block: the current stream waits on the copy's event
    seen = dst.clone()  # a GPU read on the current stream
    assert torch.equal(seen.cpu(), want)  # .cpu() syncs the current stream only


@cuda
@needs_gpu
def test_gpu_prefetch_follows_queued_reads_of_dst(gpu, gen):
    dev, engine, arena = gpu
    old = randn([2, 4, 128, 64], torch.float16, dev, gen)
    dst = old.clone()
    host = arena.allocate([2, 4, 128, 64], torch.float16)
    new = randn([2, 4, 128, 64], torch.float16, "cpu", gen)
    host.copy_(new)
    torch.cuda.synchronize()
    _sleep_ms(50)
    before = dst.clone()  # queued behind the sleep: reads dst after the host issues the prefetch
    t = engine.prefetch(host, dst, 0, 128)
    engine.wait(t)
    after = dst.clone()
    assert torch.equal(before, old), "the prefetch overwrote dst before queued work read it"
    assert torch.equal(after.cpu(), new)


@cuda
@needs_gpu
def test_gpu_round_trip_odd_offsets(gpu, gen):
    dev, engine, arena = gpu
    B, H, cap, D = 2, 8, 4096, 128
    src = randn([B, H, cap, D], torch.bfloat16, dev, gen)
    host = arena.allocate([B, H, 5001, D], torch.bfloat16)
    host.fill_(float("nan"))
    back = torch.full((B, H, cap, D), float("nan"), dtype=torch.bfloat16, device=dev)
    p0, p1, hp0 = 37, 3001, 1003
    n = p1 - p0
    t_off = engine.offload(src, host, p0, p1, hp0)
    # A chunk of the host copy back to odd positions: ordered after the offload by synchronize.
    engine.synchronize(t_off)
    assert torch.equal(host[:, :, hp0:hp0 + n], src[:, :, p0:p1].cpu()) and nan_outside(host, hp0, hp0 + n)
    t_pre = engine.prefetch(host, back, hp0 + 11, hp0 + 11 + 999, 1)
    engine.wait(t_pre)
    assert torch.equal(back[:, :, 1:1000], src[:, :, p0 + 11:p0 + 11 + 999])
    assert nan_outside(back, 1, 1000)
    assert engine.bytes_to_host == kv_bytes(src, n)
    assert engine.bytes_to_device == kv_bytes(src, 999)
    engine.synchronize()
    assert engine.pending == 0 and engine.done(t_off) and engine.done(t_pre)


@cuda
@needs_gpu
def test_gpu_prefetch_then_offload_of_the_same_buffer(gpu, gen):
    """The two copy streams are not ordered with each other: wait(ticket) puts the current stream,
    and with it every later copy, after the prefetch."""
    dev, engine, arena = gpu
    shape = [2, 8, 2048, 128]
    a = arena.allocate(shape, torch.bfloat16)
    a.copy_(randn(shape, torch.bfloat16, "cpu", gen))
    b = arena.allocate(shape, torch.bfloat16)
    b.fill_(float("nan"))
    buf = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=dev)
    torch.cuda.synchronize()
    t1 = engine.prefetch(a, buf, 0, 2048)
    engine.wait(t1)
    t2 = engine.offload(buf, b, 0, 2048)
    engine.synchronize(t2)
    assert torch.equal(b, a)
    # And the other way: offload the buffer, then prefetch new contents over it.
    c = arena.allocate(shape, torch.bfloat16)
    c.fill_(float("nan"))
    t3 = engine.offload(buf, c, 0, 2048)
    engine.wait(t3)
    t4 = engine.prefetch(b.flip(2).contiguous().pin_memory(), buf, 0, 2048)
    engine.synchronize(t4)
    assert torch.equal(c, a), "the prefetch overwrote buf before the offload read it"
    assert torch.equal(buf.cpu(), a.flip(2))


@cuda
@needs_gpu
def test_gpu_rejects_pageable_host_memory(gpu, gen):
    dev, engine, _ = gpu
    src = randn([1, 2, 16, 8], torch.float32, dev, gen)
    pageable = torch.empty(1, 2, 16, 8)
    with pytest.raises(ValueError, match="dst_host must be pinned"):
        engine.offload(src, pageable, 0, 4)
    with pytest.raises(ValueError, match="src_host must be pinned"):
        engine.prefetch(pageable, src, 0, 4)
    with pytest.raises(ValueError, match="dst_host must be a CPU tensor"):
        engine.offload(src, src.clone(), 0, 4)
    assert engine.last_ticket == 0


@cuda
@needs_gpu
def test_gpu_engine_copies_cpu_to_cpu_synchronously(gpu, gen):
    _, engine, _ = gpu
    src = randn([2, 2, 32, 8], torch.float32, "cpu", gen)
    dst = poisoned([2, 2, 32, 8], torch.float32, "cpu")
    t = engine.offload(src, dst, 4, 20)
    assert engine.done(t) and torch.equal(dst[:, :, 4:20], src[:, :, 4:20]) and nan_outside(dst, 4, 20)


@cuda
@needs_gpu
def test_gpu_keeps_tensors_alive_until_the_copy_ends(gpu, gen):
    dev, engine, arena = gpu
    shape = [4, 8, 4096, 128]
    src = randn(shape, torch.float16, dev, gen)
    want = src.cpu()
    host = arena.allocate(shape, torch.float16)
    _sleep_ms(50)
    t = engine.offload(src, host, 0, shape[2])
    del src  # the engine holds it: its memory is not handed out while the copy may still read it
    junk = torch.zeros(shape, dtype=torch.float16, device=dev)  # would reuse src's block if freed
    engine.synchronize(t)
    assert torch.equal(host, want) and junk.shape == tuple(shape)


@cuda
@needs_gpu
def test_gpu_wrong_device_and_sliced_buffers(gpu, gen):
    dev, engine, arena = gpu
    big = randn([2, 4, 300, 64], torch.float32, dev, gen)
    view = big[:, :, 50:250]  # row pitch 300 * 64, capacity 200
    host = arena.allocate([2, 4, 200, 64], torch.float32)
    host.fill_(float("nan"))
    t = engine.offload(view, host, 20, 180, 0)
    engine.synchronize(t)
    assert torch.equal(host[:, :, :160], big[:, :, 70:230].cpu()) and nan_outside(host, 0, 160)
    if torch.cuda.device_count() > 1:
        other = torch.empty(2, 4, 300, 64, device=(dev + 1) % torch.cuda.device_count())
        with pytest.raises(ValueError, match="but this engine copies for cuda:"):
            engine.offload(other, host, 0, 4)
