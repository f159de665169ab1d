"""convert(chunk_size=None): the planner picks the chunk per prompt within memory_budget, as a decreasing
per-layer schedule where the KV grows; results equal stock and the fixed-chunk loop's."""
from __future__ import annotations

import pytest
import torch

import chunkinfer
from chunkinfer.kv import placement
from chunkinfer.kv.cache import ChunkKVCache
from chunkinfer.kv.placement import PromptCall
from chunkinfer.planner.plan import plan
from chunkinfer.planner.schedule import CHUNK_LIMITS
from tests.tiny_models import make_model, max_rel_err
from tests.e2e.schedule_budget import budget_for_decreasing_schedule

RSS = 3 << 30  # what the planner reads as this process's RSS: pinned, so that budgets are deterministic
CPU = CHUNK_LIMITS["cpu"]


@pytest.fixture
def pinned_rss(monkeypatch):
    monkeypatch.setattr(placement, "current_rss", lambda: RSS)
    monkeypatch.setattr(placement, "available_memory", lambda: 16 << 30)


def kv_heavy_model():
    # KV per position and layer (4 heads x 64 x K,V x fp32 = 2 KiB) large next to the chunk work buffers
    return make_model("llama", layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=64, max_position_embeddings=16384)


def ids_of(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=gen)


def chunks_counted(model, **call) -> list[int]:
    """Run model(**call) counting the progress callback's chunks."""
    seen = []
    model._chunkinfer.progress = lambda done, total: seen.append(total)
    try:
        model(**call)
    finally:
        model._chunkinfer.progress = None
    return seen


def expected_chunks(schedule: list[int], s: int, last_rows_from: int) -> int:
    n = sum(-(-s // c) for c in schedule[:-1])
    return n + -(-last_rows_from // schedule[-1]) + -(-(s - last_rows_from) // schedule[-1])


@torch.no_grad()
def test_default_plans_the_chunk_and_an_explicit_one_is_kept(pinned_rss, gen):
    stock = make_model("llama")
    ids = ids_of(2500, gen)
    ref = stock(ids).logits
    model = chunkinfer.convert(make_model("llama"))
    state = model._chunkinfer
    assert state.plan_chunks and state.memory_budget is None
    n = chunks_counted(model, input_ids=ids, logits_to_keep=1)
    assert state.last_plan.fits and state.last_plan.chunk_schedule == [CPU.cap] * 3
    assert n[0] == expected_chunks([CPU.cap] * 3, 2500, 2499)
    assert max_rel_err(model(ids).logits, ref) < 1e-4

    chunkinfer.convert(model, chunk_size=300)  # given: used as is, nothing planned without a byte budget
    assert chunks_counted(model, input_ids=ids, logits_to_keep=1)[0] == expected_chunks([300] * 3, 2500, 2499)
    assert model._chunkinfer.last_plan is None
    assert max_rel_err(model(ids).logits, ref) < 1e-4
    # with a byte budget the given chunk is still the chunk; the plan checks that it fits
    chunkinfer.convert(model, chunk_size=300, memory_budget="64GiB")
    out = model(ids, logits_to_keep=1)
    assert model._chunkinfer.last_plan.chunk_schedule == [300] * 3
    assert max_rel_err(out.logits, ref[:, -1:]) < 1e-4


@torch.no_grad()
def test_continuation_runs_a_decreasing_schedule_with_the_same_results(pinned_rss, gen):
    past, s = 1500, 3000
    a, b = ids_of(past, gen), ids_of(s, gen)
    stock = kv_heavy_model()
    ref = stock(torch.cat([a, b], 1)).logits[:, past:]

    fixed = chunkinfer.convert(kv_heavy_model(), chunk_size=CPU.floor)
    cache_fixed = fixed(a, use_cache=True).past_key_values
    cache_sched = fixed(a, use_cache=True).past_key_values

    # a budget between what the smallest and the largest chunk need for this continuation
    call = PromptCall(1, past, s, torch.float32, torch.device("cpu"), last_layer_block=True, logits_rows=s)
    budget, p = budget_for_decreasing_schedule(fixed, call, cache_sched, CPU.floor, CPU.cap)
    schedule = p.chunk_schedule
    # the KV grows layer by layer (each buffer is reallocated when the loop reaches it): the chunk falls
    assert all(x >= y for x, y in zip(schedule, schedule[1:])) and schedule[0] > schedule[-1], schedule
    assert p.device_bytes <= budget

    planned = chunkinfer.convert(kv_heavy_model(), memory_budget=budget)
    seen = []
    planned._chunkinfer.progress = lambda done, total: seen.append(total)
    out_sched = planned(b, past_key_values=cache_sched, use_cache=True)
    assert planned._chunkinfer.last_plan.chunk_schedule == schedule
    assert seen[0] == expected_chunks(schedule, s, 0)
    out_fixed = fixed(b, past_key_values=cache_fixed, use_cache=True)

    assert max_rel_err(out_sched.logits, ref) < 1e-4 and max_rel_err(out_fixed.logits, ref) < 1e-4
    # with and without the schedule: the same numbers up to fp32 rounding of different chunk boundaries
    torch.testing.assert_close(out_sched.logits, out_fixed.logits, rtol=1e-5, atol=1e-5)
    for x, y in zip(cache_sched.layers, cache_fixed.layers):
        assert x.length == y.length == past + s
        torch.testing.assert_close(x.keys, y.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.values, y.values, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_byte_budget_too_small_raises_before_any_work(pinned_rss, gen):
    model = chunkinfer.convert(make_model("llama"), memory_budget=RSS // 2)  # below what is resident now
    ids = ids_of(600, gen)
    cache = ChunkKVCache(3)
    with pytest.raises(chunkinfer.InsufficientMemoryError, match="bytes"):
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 0 and all(layer.k_buf is None for layer in cache.layers)


@torch.no_grad()
def test_auto_that_does_not_fit_runs_the_smallest_chunk(monkeypatch, gen):
    monkeypatch.setattr(placement, "current_rss", lambda: RSS)
    monkeypatch.setattr(placement, "available_memory", lambda: 0)  # nothing left: no chunk "fits"
    stock = make_model("llama")
    ids = ids_of(1500, gen)
    model = chunkinfer.convert(make_model("llama"))
    n = chunks_counted(model, input_ids=ids, logits_to_keep=1)
    p = model._chunkinfer.last_plan
    assert not p.fits and p.chunk_schedule is None and p.breakdown_chunk == CPU.floor
    assert n[0] == expected_chunks([CPU.floor] * 3, 1500, 1499)
    assert max_rel_err(model(ids).logits, stock(ids).logits) < 1e-4


def test_memory_budget_is_validated_without_offload():
    model = make_model("llama")
    with pytest.raises(ValueError, match="memory_budget"):
        chunkinfer.convert(model, memory_budget="lots")
    with pytest.raises(ValueError, match="kv_offload=True"):
        chunkinfer.convert(model, resident_layers=1)
    assert not chunkinfer.is_converted(model)
    assert chunkinfer.convert(model, memory_budget="2GiB")._chunkinfer.memory_budget == 2 << 30


@torch.no_grad()
def test_token_logprobs_is_planned_like_a_prompt(pinned_rss, gen):
    """token_logprobs follows the converted model's budget: the plan of a prompt of the same length (with
    the head chunk's fp32 log-softmax counted) and its chunk schedule, stock's values; a budget too small
    raises before any work."""
    ids = ids_of(3000, gen)
    stock = kv_heavy_model()
    ref = torch.log_softmax(stock(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    planned = chunkinfer.convert(kv_heavy_model())
    call = PromptCall(1, 0, 3000, torch.float32, torch.device("cpu"), last_layer_block=True, logits_rows=0,
                      log_probs=True)
    want = placement.plan_prompt(planned, call, ChunkKVCache(6), chunk_size=None, memory_budget=None)
    assert want.fits
    budget = want.device_bytes
    planned._chunkinfer.memory_budget = budget
    seen = []
    planned._chunkinfer.progress = lambda done, total: seen.append(total)
    lp = chunkinfer.token_logprobs(planned, ids)
    p = planned._chunkinfer.last_plan
    assert p is not None and p.chunk_schedule is not None and p.device_bytes <= budget
    assert seen[0] == expected_chunks(p.chunk_schedule, 3000, 0)
    assert (lp - ref).abs().max() < 1e-4

    tight = chunkinfer.convert(kv_heavy_model(), memory_budget=RSS // 2)  # below what is resident now
    with pytest.raises(chunkinfer.InsufficientMemoryError, match="bytes"):
        chunkinfer.token_logprobs(tight, ids)


def test_the_log_softmax_chunk_is_counted():
    config = kv_heavy_model().config
    kw = dict(device="cpu", device_memory="64GiB", process_baseline=0, chunk_size=512, last_layer_block=True)
    plain = plan(config, 4096, logits_rows=0, **kw)
    with_lp = plan(config, 4096, logits_rows=0, log_probs=True, **kw)
    rows, v, h = min(4096, (1 << 27) // config.vocab_size), config.vocab_size, config.hidden_size
    # at most: one head chunk's normed rows and logits (bf16), their fp32 copy and log-softmax, the result;
    # scaled by the CPU calibration (1.108) and its 10% margin
    most = (rows * (v + h) * 2 + (2 * rows * v + 4096) * 4) * 1.25
    assert 0 < with_lp.peak_alloc_beyond_weights - plain.peak_alloc_beyond_weights <= most
