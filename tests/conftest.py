from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

# Each test that takes `device` runs on the CPU and, marked `cuda`, on the GPU (skipped without one).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]),
]

# ‖out − ref‖ / ‖ref‖ against a float64 reference, by dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (an element left unwritten?)"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def gen():
    """Fresh random inputs every run: the seed is drawn, not fixed, and printed on failure."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
