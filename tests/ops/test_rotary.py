"""rotary_kv_write against the float64 reference, on CPU and (marked cuda) GPU.

The cache is NaN before the call: positions the op must write are checked against the reference,
every other position must still be NaN (nothing written out of place).
"""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import reference

from ..conftest import DEVICES, TOLERANCE, randn, rel_err

pytestmark = pytest.mark.skipif(not ops.has_kernel("rotary_kv_write", "CPU"),
                                reason="the compiled extension is not loaded")


def rope_tables(B, T, R, dtype, device, gen):
    """cos, sign-folded sin [B, T, R] of random positions, as layer_loop's _Rope builds them."""
    pos = torch.randint(0, 100_000, (B, T, 1), generator=gen).double()
    inv = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    ang = torch.cat([pos * inv, pos * inv], dim=-1)
    sin = ang.sin()
    sin[..., : R // 2] *= -1
    return ang.cos().to(dtype).to(device), sin.to(dtype).to(device)


def run_case(device, dtype, gen, *, B, T, Hq, Hkv, D, R, cap, index, per_batch=True, with_q=True,
             fused_qkv=False):
    if fused_qkv:  # q, k, v as strided views of one projection output, as Phi-3's qkv_proj gives
        qkv = randn((B, T, (Hq + 2 * Hkv) * D), dtype, device, gen)
        q = qkv[..., : Hq * D].view(B, T, Hq, D)
        k = qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
        v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    else:
        q, k, v = (randn((B, T, h, D), dtype, device, gen) for h in (Hq, Hkv, Hkv))
    cos, sin = rope_tables(B if per_batch else 1, T, R, dtype, device, gen)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    kc = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    idx = torch.tensor(index, dtype=torch.long, device=device)
    ops.rotary_kv_write(q if with_q else None, k, v, cos, sin, kc, vc, idx)

    f64 = [t.double() for t in (cos, sin)]
    tol = TOLERANCE[dtype]
    if with_q:
        assert rel_err(q, reference.rotate(q0.double(), *f64)) <= tol
    else:
        assert torch.equal(q, q0)
    assert torch.equal(k, k0) and torch.equal(v, v0), "k and v are inputs: they must not change"
    k_ref = reference.rotate(k0.double(), *f64)
    written = [p for p in index if 0 <= p < cap]
    for t, p in enumerate(index):
        if 0 <= p < cap:
            assert rel_err(kc[:, :, p], k_ref[:, t]) <= tol
            assert torch.equal(vc[:, :, p], v0[:, t]), "v is copied bit for bit"
    others = [p for p in range(cap) if p not in written]
    assert kc[:, :, others].isnan().all() and vc[:, :, others].isnan().all(), "wrote outside index"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,R", [(64, 64), (128, 128), (256, 256), (96, 32)])
def test_matches_reference(device, dtype, D, R, gen):
    run_case(device, dtype, gen, B=2, T=5, Hq=8, Hkv=2, D=D, R=R, cap=40, index=[3, 9, 10, 11, 39])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_shape_and_shared_tables(device, gen):
    # one new token, cos/sin shared by the batch (one row), as a decode step with equal positions has
    run_case(device, torch.bfloat16, gen, B=3, T=1, Hq=32, Hkv=8, D=128, R=128, cap=300, index=[257],
             per_batch=False)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_qkv_views_and_kv_only(device, gen):
    run_case(device, torch.float32, gen, B=2, T=7, Hq=6, Hkv=2, D=64, R=64, cap=16, index=list(range(4, 11)),
             fused_qkv=True)
    run_case(device, torch.float32, gen, B=1, T=3, Hq=4, Hkv=4, D=64, R=64, cap=8, index=[0, 1, 2], with_q=False)


@pytest.mark.parametrize("device", DEVICES)
def test_positions_outside_the_capacity_are_skipped(device, gen):
    run_case(device, torch.float32, gen, B=1, T=4, Hq=4, Hkv=2, D=64, R=64, cap=8, index=[-1, 2, 8, 100])


@pytest.mark.parametrize("device", DEVICES)
def test_large_prefill_chunk(device, gen):
    T = 1000
    run_case(device, torch.bfloat16, gen, B=1, T=T, Hq=8, Hkv=2, D=128, R=128, cap=T + 50,
             index=list(range(50, 50 + T)))


def _args(**over):
    B, T, Hq, Hkv, D = 1, 2, 4, 2, 64
    a = dict(q=torch.randn(B, T, Hq, D), k=torch.randn(B, T, Hkv, D), v=torch.randn(B, T, Hkv, D),
             cos=torch.randn(1, T, D), sin=torch.randn(1, T, D), k_cache=torch.zeros(B, Hkv, 8, D),
             v_cache=torch.zeros(B, Hkv, 8, D), index=torch.tensor([0, 1]))
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(index=torch.tensor([0, 1], dtype=torch.int32)), "index must be int64"),
    (dict(index=torch.tensor([0])), r"index must have shape \[2\]"),
    (dict(cos=torch.randn(1, 2, 63), sin=torch.randn(1, 2, 63)), "must be even"),
    (dict(cos=torch.randn(1, 2, 66), sin=torch.randn(1, 2, 66)), "must be even and between 2 and the head dim"),
    (dict(sin=torch.randn(1, 2, 32)), "sin must have cos's shape"),
    (dict(v=torch.randn(1, 2, 2, 64, dtype=torch.float64)), "v must be float32, float16 or bfloat16"),
    (dict(k_cache=torch.zeros(1, 3, 8, 64)), "k_cache must be"),
    (dict(q=torch.randn(1, 2, 64, 4).transpose(2, 3)), "q must be contiguous in its last dimension"),
    (dict(k=torch.randn(1, 2, 2, 64).half()), "has dtype"),
])
def test_bad_arguments_name_the_problem(over, match):
    a = _args(**over)
    before = a["k_cache"].clone()
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.rotary_kv_write(**a)
    assert torch.equal(a["k_cache"], before)
