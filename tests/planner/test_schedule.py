"""The planner's per-layer chunk schedule: the memory of a call layer by layer, the largest chunks that fit,
decreasing where the KV grows (a continuation, or a prefill under a tight budget)."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from chunkinfer import plan
from chunkinfer.planner.schedule import CallMemory, ChunkWork, choose, describe
from chunkinfer.planner.memory import Calibration, kv_capacity
from chunkinfer.planner.schedule import CHUNK_LIMITS

GiB = 1 << 30


def llama8b():
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def H200(seq, **kw):
    kw.setdefault("device_memory", "139GiB")
    kw.setdefault("host_memory", "120GiB")
    return plan(llama8b(), seq, **kw)


def random_memory(rng: random.Random, layers: int, continuation: bool) -> CallMemory:
    old = [rng.randrange(1, 50) * 1000 if continuation else 0 for _ in range(layers)]
    new = [o + rng.randrange(0, 50) * 1000 for o in old]
    per_row = rng.randrange(1, 20)
    return CallMemory(kv_old=old, kv_new=new, fixed=rng.randrange(0, 10**5),
                      work=lambda c: ChunkWork(per_row * c, 3 * per_row * c, per_row * c // 2))


def brute_force_peak(mem: CallMemory, chunks: list[int]) -> int:
    """The same peak, written out from the definition: layer l runs with layers <= l grown."""
    peaks = []
    for li, c in enumerate(chunks):
        alive = sum(mem.kv_new[:li + 1]) + sum(mem.kv_old[li + 1:])
        w = mem.work(c)
        last = li == len(chunks) - 1
        steady = alive + w.activation + (w.kv_only if last else w.block)
        growing = mem.kv_old[li] and mem.kv_old[li] != mem.kv_new[li]
        peaks.append(mem.fixed + max(steady, alive + mem.kv_old[li] + w.activation if growing else 0))
    return max(peaks)


@pytest.mark.parametrize("continuation", [False, True])
def test_choose_is_the_largest_non_increasing_schedule_under_the_budget(continuation):
    rng = random.Random()
    cands = [4096, 2048, 1024, 512]
    for _ in range(200):
        mem = random_memory(rng, rng.randrange(1, 9), continuation)
        lo, hi = brute_force_peak(mem, [512] * mem.layers), brute_force_peak(mem, [4096] * mem.layers)
        budget = rng.randrange(lo - 1000, hi + 1000)
        got = choose(mem, cands, lambda b: b <= budget)
        if got is None:  # nothing fits only when the smallest chunk everywhere does not
            assert brute_force_peak(mem, [512] * mem.layers) > budget
            continue
        assert all(a >= b for a, b in zip(got, got[1:]))
        assert mem.peak(got)[0] == brute_force_peak(mem, got) <= budget
        # each layer's chunk is the largest allowed: one step larger at any layer breaks the budget
        # or the order
        for li, c in enumerate(got):
            if c == cands[0] or (li and got[li - 1] == c):
                continue
            assert mem.at(li, 2 * c) > budget


def test_schedule_decreases_as_the_kv_grows_in_a_continuation():
    # 262,144 tokens cached, 65,536 appended: each layer's buffer grows when the loop reaches it
    past, seq = 262144, 65536
    roomy = H200(seq, past=past)
    assert roomy.fits and roomy.chunk_schedule == [8192] * 32  # room for the cap everywhere
    tight_hi = H200(seq, past=past, chunk_size=8192).device_bytes
    tight_lo = H200(seq, past=past, chunk_size=1024).device_bytes
    mid = H200(seq, past=past, device_memory=(tight_lo + tight_hi) // 2, allow_offload=False)
    s = mid.chunk_schedule
    assert mid.fits and all(a >= b for a, b in zip(s, s[1:])) and s[0] > s[-1], s
    assert mid.device_bytes <= (tight_lo + tight_hi) // 2
    assert mid.chunk_size == min(s) and "chunk sizes" in mid.table() and "layers" in mid.table()
    # a uniform chunk that fits at the last layer is what the schedule ends with; the first layers run
    # larger chunks because less KV has grown there
    uniform = H200(seq, past=past, chunk_size=s[-1], device_memory=(tight_lo + tight_hi) // 2, allow_offload=False)
    assert uniform.fits and uniform.device_bytes <= mid.device_bytes


def cache_capacities(past: int, seq: int) -> tuple[int, int]:
    """(capacity after a prefill of past tokens, after appending seq) as the real cache grows it (meta tensors)."""
    from chunkinfer.kv.device_layer import PREFILL_HEADROOM, KVBuffers

    kv = KVBuffers()
    kv.reserve(1, 8, 128, torch.bfloat16, torch.device("meta"), past, PREFILL_HEADROOM)
    old = kv.k_buf.shape[2]
    kv.reserve(1, 8, 128, torch.bfloat16, torch.device("meta"), past + seq, PREFILL_HEADROOM)
    return old, kv.k_buf.shape[2]


def test_continuation_counts_old_and_new_buffers():
    past, seq = 131072, 32768
    p = H200(seq, past=past, chunk_size=8192)
    old_cap, new_cap = cache_capacities(past, seq)
    assert kv_capacity(past)[0] == old_cap
    per_layer_position = 2 * 8 * 128 * 2
    assert p.kv_capacity == new_cap > old_cap
    assert p.device_breakdown["KV resident"] == 32 * new_cap * per_layer_position
    # the residual stream holds only the new tokens
    assert p.device_breakdown["residual stream"] == seq * 4096 * 2 + 2 * seq * 8
    # a cache with room left does not grow
    roomy = H200(seq, past=past, past_capacity=past + seq, chunk_size=8192)
    assert roomy.kv_capacity == past + seq and roomy.device_bytes < p.device_bytes
    # more prefix -> more attention work
    assert p.prefill_seconds > H200(seq, chunk_size=8192).prefill_seconds


def test_explicit_chunk_is_uniform_and_prefill_shrinks_only_under_pressure():
    assert H200(131072, chunk_size=4096).chunk_schedule == [4096] * 32
    c16 = H200(524288, chunk_size=16384).device_bytes
    c8 = H200(524288, chunk_size=8192).device_bytes
    p = H200(524288, device_memory=(c8 + c16) // 2)
    s = p.chunk_schedule
    assert p.chunk_size == 8192 == s[-1] and all(a >= b for a, b in zip(s, s[1:]))
    assert p.device_bytes <= (c8 + c16) // 2


def test_cpu_limits_and_calibration_terms():
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, head_dim=64)
    p = plan(cfg, 8192, dtype="float32", device="cpu", process_baseline=700 << 20, device_memory="16GiB")
    lim = CHUNK_LIMITS["cpu"]
    assert p.fits and p.chunk_schedule == [lim.cap] * 30 and p.prefill_seconds is None
    assert p.device_breakdown["process baseline"] == 700 << 20
    assert p.device_breakdown["weights"] == (576 * 49152 + 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536
                                                                  + 2 * 576) + 576) * 4
    assert "host" not in p.table() and "peak RSS" in p.table()
    # a calibration replaces the default correction: offset + (scale - 1) x shapes
    cal = Calibration(offset=12345678, scale=1.25)
    q = plan(cfg, 8192, dtype="float32", device="cpu", process_baseline=700 << 20, device_memory="16GiB",
             calibration=cal)
    assert q.shape_bytes == p.shape_bytes
    assert q.device_breakdown["runtime and malloc overhead"] == 12345678 + int(0.25 * q.shape_bytes)
    assert q.peak_alloc_beyond_weights == q.shape_bytes + cal.overhead(q.shape_bytes)
    # a budget below the floor's need: does not fit, says so
    tight = plan(cfg, 8192, dtype="float32", device="cpu", process_baseline=700 << 20, device_memory="1GiB")
    assert not tight.fits and "RSS" in tight.reason and f"{1 << 30:,} bytes" in tight.reason
    with pytest.raises(ValueError, match="process_baseline"):
        plan(cfg, 8192, device_memory="80GiB", host_memory="80GiB", process_baseline=1)
    with pytest.raises(ValueError, match="CPU"):
        plan(cfg, 8192, device="cpu", device_memory="8GiB", process_baseline=0, resident_layers=3)
    with pytest.raises(ValueError, match="device must be"):
        plan(cfg, 8192, device="tpu", device_memory="8GiB")


def test_all_logits_and_bad_continuations():
    # returning every position's logits: [S, vocab] after the loop counts
    one = H200(32768, chunk_size=8192)
    every = H200(32768, chunk_size=8192, logits_rows=32768, last_layer_block=True)
    d = every.device_breakdown
    assert every.shape_bytes >= d["residual stream"] + d["KV resident"] + 32768 * 128256 * 2 > one.shape_bytes
    with pytest.raises(ValueError, match="past_capacity"):
        H200(1024, past=4096, past_capacity=1000)
    with pytest.raises(ValueError, match="past must be >= 0"):
        H200(1024, past=-1)


def test_describe():
    assert describe([8192] * 4) == "8192"
    assert describe([16384, 16384, 8192, 4096]) == "16384 x 2, 8192 x 1, 4096 x 1 (layers 0-1, 2, 3)"
