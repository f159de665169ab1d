"""On the GPU (an H200 for these lengths): the Llama-3.1-8B shape with convert()'s planned chunks; the plan
the forward ran with predicts torch's peak allocation beyond the weights within 10% (measured as
bench/bench_model.py measures it: from the weights alone, after a warm-up)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import chunkinfer

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: bench/


@pytest.fixture(scope="module")
def model_8b():
    from bench.bench_model import build_model, reset_memory, warm_up

    model = chunkinfer.convert(build_model(32, llama3_rope=False))  # chunk_size=None: planned per prompt
    reset_memory()
    # earlier tests of the same process may leave tensors behind: peaks count from what is allocated now
    base = torch.cuda.memory_allocated()
    warm_up(model)
    return model, base, reset_memory


@pytest.mark.parametrize("length", [32768, 131072, 524288])
@torch.no_grad()
def test_planned_chunks_peak_within_10_percent(model_8b, length):
    model, base, reset_memory = model_8b
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    reset_memory()
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() - base
    p = model._chunkinfer.last_plan
    print(f"\n{length}: chunks {p.chunks_text()}, {seconds:.2f} s ({length / seconds:,.0f} tok/s), "
          f"peak beyond weights {peak / 2**30:.2f} GiB, plan {p.peak_alloc_beyond_weights / 2**30:.2f} GiB, "
          f"plan's prefill {p.prefill_seconds:.2f} s")
    del out
    assert p.fits and abs(p.device_breakdown["weights"] - weights) / weights < 1e-3  # + rotary buffers
    assert abs(p.peak_alloc_beyond_weights - peak) / peak <= 0.10
