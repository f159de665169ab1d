"""silu_and_mul / gelu_and_mul against the float64 reference, every form, dtype and odd size."""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import reference
from tests.conftest import CUDA, DEVICES, TOLERANCE, poisoned, randn, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = [("silu", None), ("gelu", "none"), ("gelu", "tanh")]


def call(act, approx, x, up=None, out=None):
    if act == "silu":
        return ops.silu_and_mul(x, up, out=out)
    return ops.gelu_and_mul(x, up, approximate=approx, out=out)


def ref(act, approx, x, up=None):
    up = None if up is None else up.double()
    if act == "silu":
        return reference.silu_and_mul(x.double(), up)
    return reference.gelu_and_mul(x.double(), up, approx)


def shapes(device):
    # (rows, d): odd widths, 1 and 3 rows; the big rows only where the memory is.
    out = [(r, d) for r in (1, 3) for d in (1, 5, 11008, 14336)] + [(32768, 5), (32768, 1)]
    if device == "cuda":
        out += [(32768, 11008), (32768, 14336)]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,approx", ACTS)
def test_fused_gate_up_matches_float64(device, dtype, act, approx, gen):
    for rows, d in shapes(device):
        x = randn((rows, 2 * d), dtype, device, gen, scale=3.0)
        out = poisoned((rows, d), dtype, device)
        call(act, approx, x, out=out)
        err = rel_err(out, ref(act, approx, x))
        assert err <= TOLERANCE[dtype], f"rows={rows} d={d}: rel err {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,approx", ACTS)
def test_two_input_form_and_leading_dims(device, dtype, act, approx, gen):
    gate = randn((2, 3, 7, 37), dtype, device, gen, scale=3.0)
    up = randn((2, 3, 7, 37), dtype, device, gen)
    got = call(act, approx, gate, up)
    assert got.shape == gate.shape and got.dtype == dtype
    assert rel_err(got, ref(act, approx, gate, up)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_in_and_out(device, dtype, gen):
    """Row-strided views (a slice of a projection's output, a chunk of a bigger buffer) need no copy."""
    d = 96
    big = randn((4, 5, 3 * d), dtype, device, gen, scale=2.0)
    gate, up = big[..., :d], big[..., 2 * d:]
    buffer = poisoned((4, 5, 2 * d), dtype, device)
    out = buffer[..., d:]
    ops.silu_and_mul(gate, up, out=out)
    assert torch.isnan(buffer[..., :d]).all(), "wrote outside the out view"
    assert rel_err(out, reference.silu_and_mul(gate.double(), up.double())) <= TOLERANCE[dtype]
    # the fused layout itself as a row-strided view: every other row of a [8, 2d] buffer
    x = randn((8, 2 * d), dtype, device, gen)[::2]
    assert rel_err(ops.silu_and_mul(x), reference.silu_and_mul(x.double())) <= TOLERANCE[dtype]
    # chunks of batched [B, S, .] buffers: rows in two strided groups, written in place
    gate_up = randn((3, 40, 2 * d), dtype, device, gen)[:, 8:20]
    act = poisoned((3, 40, d), dtype, device)
    ops.silu_and_mul(gate_up, out=act[:, 8:20])
    assert torch.isnan(act[:, :8]).all() and torch.isnan(act[:, 20:]).all(), "wrote outside the chunk"
    assert rel_err(act[:, 8:20], reference.silu_and_mul(gate_up.double())) <= TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_problem(device, gen):
    x = randn((4, 10), torch.float32, device, gen)
    with pytest.raises(RuntimeError, match="must be even"):
        ops.silu_and_mul(x[:, :9])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.silu_and_mul(x.double())
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        ops.silu_and_mul(randn((10, 4), torch.float32, device, gen).t())
    with pytest.raises(RuntimeError, match="two strided groups"):
        ops.silu_and_mul(randn((2, 3, 4, 10), torch.float32, device, gen)[:, :2, :2])
    with pytest.raises(RuntimeError, match="up must have the shape of gate"):
        ops.silu_and_mul(x, x[:, :5])
    with pytest.raises(RuntimeError, match="out must have shape"):
        ops.silu_and_mul(x, out=torch.empty(4, 4, device=device))
    with pytest.raises(RuntimeError, match="out has dtype"):
        ops.silu_and_mul(x, out=torch.empty(4, 5, device=device, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="'none' or 'tanh'"):
        ops.gelu_and_mul(x, approximate="erf")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_refuses_mixed_devices(gen):
    x = randn((4, 10), torch.float32, "cuda", gen)
    with pytest.raises(RuntimeError, match="out is on cpu"):
        ops.silu_and_mul(x, out=torch.empty(4, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype, gen):
    x = randn((3, 2 * 24), dtype, device, gen)
    gate, up = x[:, :24].contiguous(), x[:, 24:].contiguous()
    out = torch.empty(3, 24, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.chunkinfer.silu_and_mul.default, (x, None))
    torch.library.opcheck(torch.ops.chunkinfer.silu_and_mul.default, (gate, up))
    torch.library.opcheck(torch.ops.chunkinfer.silu_and_mul_out.default, (out, x, None))
    torch.library.opcheck(torch.ops.chunkinfer.gelu_and_mul.default, (x, None, "tanh"))
    torch.library.opcheck(torch.ops.chunkinfer.gelu_and_mul_out.default, (out, gate, up, "none"))
