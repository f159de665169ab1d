"""On the GPU: calibrate() and the planned (decreasing) chunk schedule against torch's measured peak allocation."""
from __future__ import annotations

import copy

import pytest
import torch

import chunkinfer
from chunkinfer.kv.placement import PromptCall
from chunkinfer.planner.schedule import CHUNK_LIMITS
from tests.tiny_models import make_model, max_rel_err
from tests.e2e.schedule_budget import budget_for_decreasing_schedule

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = CHUNK_LIMITS["cuda"]


def gpu_model():
    return make_model("llama", layers=8, dtype=torch.bfloat16, device="cuda", hidden_size=1024,
                      intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                      vocab_size=32000, max_position_embeddings=131072)


def ids_of(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(3, 32000, (1, n), generator=gen).cuda()


def measured_call(model, ids, **kw) -> tuple[object, int]:
    """(output, peak bytes allocated during the call beyond what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = model(ids, **kw)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


@torch.no_grad()
def test_calibrated_plan_predicts_the_peak_allocation(gen):
    model = chunkinfer.convert(gpu_model())
    ids = ids_of(65536, gen)
    model(ids[:, :4096], use_cache=True, logits_to_keep=1)  # warm-up: workspaces made once per process
    out, uncalibrated = measured_call(model, ids, use_cache=True, logits_to_keep=1)
    default = model._chunkinfer.last_plan
    del out
    cal = chunkinfer.calibrate(model)  # 4 chunks of the model's default chunk
    assert model._chunkinfer.calibration is cal and cal.source.startswith("calibrate()")
    out, peak = measured_call(model, ids, use_cache=True, logits_to_keep=1)
    p = model._chunkinfer.last_plan
    print(f"peak {peak:,} B; calibrated plan {p.peak_alloc_beyond_weights:,} B ({cal}); "
          f"default plan {default.peak_alloc_beyond_weights:,} B (measured then {uncalibrated:,} B)")
    assert p.calibration is cal and p.chunk_schedule == default.chunk_schedule
    assert abs(p.peak_alloc_beyond_weights - peak) / peak <= 0.10
    # another converted model keeps the default
    other = chunkinfer.convert(gpu_model())
    other(ids[:, :4096], use_cache=True, logits_to_keep=1)
    assert other._chunkinfer.calibration is None and other._chunkinfer.last_plan.calibration == default.calibration


@torch.no_grad()
def test_decreasing_schedule_on_a_continuation_keeps_results_and_the_peak(gen):
    past, s = 16384, 49152
    base = gpu_model()
    a, b = ids_of(past, gen), ids_of(s, gen)
    fixed = chunkinfer.convert(copy.deepcopy(base), chunk_size=CUDA.floor)
    cache_fixed = fixed(a, use_cache=True).past_key_values
    cache_sched = fixed(a, use_cache=True).past_key_values
    device = torch.device("cuda", torch.cuda.current_device())

    call = PromptCall(1, past, s, torch.bfloat16, device)
    budget, p = budget_for_decreasing_schedule(fixed, call, cache_sched, CUDA.floor, CUDA.cap)
    schedule = p.chunk_schedule
    assert all(x >= y for x, y in zip(schedule, schedule[1:])) and schedule[0] > schedule[-1], schedule

    planned = chunkinfer.convert(base, memory_budget=budget)
    old_kv = sum(layer.nbytes() for layer in cache_sched.layers)
    out_sched, grew = measured_call(planned, b, past_key_values=cache_sched, use_cache=True, logits_to_keep=1)
    p = planned._chunkinfer.last_plan
    assert p.chunk_schedule == schedule
    # the plan counts the old buffers too (they are alive until each layer's copy); workspaces made
    # by the earlier calls are not in this call's growth, so the shapes alone are compared
    peak = grew + old_kv
    print(f"schedule {schedule}; peak {peak:,} B, plan's shapes {p.shape_bytes:,} B")
    assert abs(p.shape_bytes - peak) / peak <= 0.10

    out_fixed = fixed(b, past_key_values=cache_fixed, use_cache=True, logits_to_keep=1)
    assert max_rel_err(out_sched.logits, out_fixed.logits) < 2e-2  # bf16, different chunk boundaries
    for x, y in zip(cache_sched.layers, cache_fixed.layers):
        assert x.length == y.length == past + s
        assert max_rel_err(x.keys, y.keys) < 2e-2 and max_rel_err(x.values, y.values) < 2e-2
