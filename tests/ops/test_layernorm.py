"""rms_norm / fused_add_rms_norm against the float64 reference; Llama and Gemma flavours."""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import reference
from tests.conftest import DEVICES, TOLERANCE, poisoned, randn, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def shapes(device):
    out = [(r, h) for r in (1, 3) for h in (1, 5, 4096, 11008, 14336)] + [(32768, 5), (32768, 64)]
    if device == "cuda":
        out += [(32768, 4096), (32768, 14336)]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm_matches_float64(device, dtype, gemma, gen):
    for rows, h in shapes(device):
        x = randn((rows, h), dtype, device, gen, scale=4.0)
        w = randn((h,), dtype, device, gen)
        out = poisoned((rows, h), dtype, device)
        ops.rms_norm(x, w, 1e-6, gemma=gemma, out=out)
        err = rel_err(out, reference.rms_norm(x.double(), w.double(), 1e-6, gemma))
        assert err <= TOLERANCE[dtype], f"rows={rows} h={h}: rel err {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_fused_add_rms_norm_matches_float64(device, dtype, gemma, gen):
    for rows, h in shapes(device):
        x = randn((rows, h), dtype, device, gen, scale=2.0)
        residual = randn((rows, h), dtype, device, gen, scale=4.0)
        w = randn((h,), dtype, device, gen)
        want_norm, want_res = reference.fused_add_rms_norm(x.double(), residual.double(), w.double(), 1e-5, gemma)
        ops.fused_add_rms_norm(x, residual, w, 1e-5, gemma=gemma)
        assert rel_err(residual, want_res) <= TOLERANCE[dtype], f"residual rows={rows} h={h}"
        assert rel_err(x, want_norm) <= TOLERANCE[dtype], f"output rows={rows} h={h}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_follows_hf(device, dtype, gen):
    """Same rounding points as the HF modules: at most one ulp apart from the dtype-level reference."""
    x = randn((64, 256), dtype, device, gen, scale=3.0)
    w = randn((256,), dtype, device, gen)
    got = ops.rms_norm(x, w, 1e-6)
    want = reference.rms_norm(x, w, 1e-6)  # evaluated in fp32 with the dtype roundings
    ulp = torch.finfo(dtype).eps * want.abs().float().clamp_min(1e-3)
    assert ((got.float() - want.float()).abs() <= 2 * ulp).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_dims_and_strided_rows(device, dtype, gen):
    h = 128
    x = randn((2, 3, 5, h), dtype, device, gen)
    w = randn((h,), dtype, device, gen)
    assert rel_err(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x.double(), w.double(), 1e-6)) <= TOLERANCE[dtype]
    # rows of a chunk taken from a wider buffer (e.g. [S, 2h] holding two streams)
    buf = randn((6, 2 * h), dtype, device, gen)
    res_buf = randn((6, 2 * h), dtype, device, gen)
    xs, rs = buf[:, :h], res_buf[:, h:]
    want_norm, want_res = reference.fused_add_rms_norm(xs.double(), rs.double(), w.double(), 1e-6)
    untouched = buf[:, h:].clone()
    ops.fused_add_rms_norm(xs, rs, w, 1e-6)
    assert torch.equal(buf[:, h:], untouched)
    assert rel_err(xs, want_norm) <= TOLERANCE[dtype] and rel_err(rs, want_res) <= TOLERANCE[dtype]
    # a chunk of a batched residual stream [B, S, H]: rows in two strided groups, updated in place
    stream = randn((3, 40, h), dtype, device, gen, scale=2.0)
    attn = randn((3, 40, h), dtype, device, gen)
    xs, rs = attn[:, 8:20], stream[:, 8:20]
    want_norm, want_res = reference.fused_add_rms_norm(xs.double(), rs.double(), w.double(), 1e-6)
    before = stream.clone()
    ops.fused_add_rms_norm(xs, rs, w, 1e-6)
    assert torch.equal(stream[:, :8], before[:, :8]) and torch.equal(stream[:, 20:], before[:, 20:])
    assert rel_err(xs, want_norm) <= TOLERANCE[dtype] and rel_err(rs, want_res) <= TOLERANCE[dtype]
    out = poisoned((3, 12, h), dtype, device)
    ops.rms_norm(stream[:, 8:20], w, 1e-6, out=out)
    assert rel_err(out, reference.rms_norm(stream[:, 8:20].double(), w.double(), 1e-6)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_problem(device, gen):
    x = randn((4, 16), torch.float32, device, gen)
    w = randn((16,), torch.float32, device, gen)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[16\]"):
        ops.rms_norm(x, w[:8], 1e-6)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.rms_norm(x, w.half(), 1e-6)
    with pytest.raises(RuntimeError, match="eps must be non-negative"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(RuntimeError, match="must be different tensors"):
        ops.fused_add_rms_norm(x, x, w, 1e-6)
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        ops.fused_add_rms_norm(x, x[:2].clone(), w, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        ops.rms_norm(randn((16, 4), torch.float32, device, gen).t(), randn((16,), torch.float32, device, gen), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype, gen):
    x = randn((3, 40), dtype, device, gen)
    w = randn((40,), dtype, device, gen)
    res = randn((3, 40), dtype, device, gen)
    torch.library.opcheck(torch.ops.chunkinfer.rms_norm.default, (x, w, 1e-6, False))
    torch.library.opcheck(torch.ops.chunkinfer.rms_norm_out.default, (torch.empty_like(x), x, w, 1e-6, True))
    torch.library.opcheck(torch.ops.chunkinfer.fused_add_rms_norm.default, (x.clone(), res.clone(), w, 1e-6, False))
