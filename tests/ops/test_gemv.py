"""gemv / gemv_act_and_mul against the float64 reference: every dtype, row count, epilogue."""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import reference
from tests.conftest import DEVICES, TOLERANCE, poisoned, randn, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def shapes(device):
    """(K, segment out_features): a decode step's q|k|v and o_proj; odd widths on the CPU only (the
    CUDA kernel reads 16-byte vectors)."""
    out = [(64, (96,)), (256, (128, 32, 32)), (4096, (4096, 1024, 1024))]
    if device == "cpu":
        out += [(5, (3, 7)), (1, (1,))]
    else:
        out += [(14336, (4096,)), (8, (1, 2, 3, 4))]
    return out


def poison_allocator(device, nbytes: int) -> None:
    """On CUDA, fill a block the caching allocator hands out next with NaN, so a freshly allocated
    output with an element left unwritten fails rel_err's finiteness check."""
    if device == "cuda":
        torch.full((nbytes // 4 + 1024,), float("nan"), device=device)  # freed at once, reused next


def fits(device, rows: int, k: int, dtype) -> bool:
    """Whether x fits the CUDA kernel's shared memory (beyond it the layer code uses F.linear)."""
    return device == "cpu" or rows * k * dtype.itemsize <= ops.GEMV_MAX_X_BYTES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17])
def test_gemv_matches_float64(device, dtype, rows, gen):
    if device == "cuda" and rows > ops.GEMV_MAX_ROWS:
        pytest.skip("on CUDA a call holds at most GEMV_MAX_ROWS rows")
    for k, outs in shapes(device):
        if not fits(device, rows, k, dtype):
            continue
        x = randn((rows, 1, k), dtype, device, gen)
        ws = [randn((m, k), dtype, device, gen, scale=k ** -0.5) for m in outs]
        bs = [randn((m,), dtype, device, gen) if i % 2 else None for i, m in enumerate(outs)]
        poison_allocator(device, rows * sum(outs) * x.element_size())
        got = ops.gemv(x, ws, bs)
        assert got.shape == (rows, 1, sum(outs)) and got.dtype == dtype
        want = reference.gemv(x.double(), [w.double() for w in ws], [None if b is None else b.double() for b in bs])
        err = rel_err(got, want)
        assert err <= TOLERANCE[dtype], f"K={k} outs={outs}: rel err {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,approximate", [("silu", "none"), ("gelu", "none"), ("gelu", "tanh")])
def test_gemv_act_and_mul_matches_float64(device, dtype, activation, approximate, gen):
    sizes = [(64, 96), (4096, 14336)] if device == "cuda" else [(64, 96), (37, 11)]
    for rows in (1, 3, 4) if device == "cuda" else (1, 3, 4, 9):
        for k, inter in sizes:
            x = randn((rows, k), dtype, device, gen)
            gate = randn((inter, k), dtype, device, gen, scale=3 * k ** -0.5)
            up = randn((inter, k), dtype, device, gen, scale=k ** -0.5)
            poison_allocator(device, rows * inter * x.element_size())
            got = ops.gemv_act_and_mul(x, gate, up, activation, approximate=approximate)
            want = reference.gemv_act_and_mul(x.double(), gate.double(), up.double(), activation, approximate)
            err = rel_err(got, want)
            assert err <= TOLERANCE[dtype], f"rows={rows} K={k} I={inter}: rel err {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_norm_prologue_matches_float64(device, dtype, rows, gemma, gen):
    """h = rms_norm(x + add) computed in the projection's launch; residual_out gets x + add rounded
    once, exactly as the separate add rounds it; without add, residual_out is a copy of x."""
    for k, outs in [(64, (96,)), (4096, (4096, 1024, 1024))] + ([(5, (3,))] if device == "cpu" else []):
        for with_add in (True, False):
            x = randn((rows, 1, k), dtype, device, gen)
            add = randn((rows, 1, k), dtype, device, gen) if with_add else None
            nw = randn((k,), dtype, device, gen, scale=0.5) + 1
            ws = [randn((m, k), dtype, device, gen, scale=k ** -0.5) for m in outs]
            gate, up = (randn((48, k), dtype, device, gen, scale=k ** -0.5) for _ in range(2))
            want_res = x if add is None else (x.double() + add.double()).to(dtype)
            h = reference.rms_norm(want_res, nw, 1e-5, gemma).double()  # rounded to dtype, as the op defines h
            for call, want in [
                (lambda n: ops.gemv(x, ws, norm=n), reference.gemv(h, [w.double() for w in ws], [None] * len(ws))),
                (lambda n: ops.gemv_act_and_mul(x, gate, up, norm=n),
                 reference.gemv_act_and_mul(h, gate.double(), up.double(), "silu")),
            ]:
                res = poisoned(x.shape, dtype, device)
                got = call(ops.NormPrologue(nw, 1e-5, gemma, add=add, residual_out=res))
                assert torch.equal(res, want_res), f"K={k}: residual_out is not x + add rounded once"
                err = rel_err(got, want)
                assert err <= TOLERANCE[dtype], f"K={k} outs={outs} add={with_add}: rel err {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_norm_prologue_equals_the_separate_norm(device, gen):
    """bf16: the prologue's h is rms_norm's h (same rounding points), so the projection matches the
    unfused fused_add_rms_norm + gemv to bf16 rounding of the outputs."""
    dtype, k = torch.bfloat16, 4096
    x, add = randn((1, 1, k), dtype, device, gen), randn((1, 1, k), dtype, device, gen)
    nw = randn((k,), dtype, device, gen, scale=0.5) + 1
    ws = [randn((m, k), dtype, device, gen, scale=k ** -0.5) for m in (4096, 1024, 1024)]
    h, res = add.clone(), x.clone()
    ops.fused_add_rms_norm(h, res, nw, 1e-6)
    spare = torch.empty_like(x)
    got = ops.gemv(x, ws, norm=ops.NormPrologue(nw, 1e-6, add=add, residual_out=spare))
    assert torch.equal(spare, res)
    torch.testing.assert_close(got, ops.gemv(h, ws), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_equals_the_unfused_projections(device, gen):
    """In fp32 the fused epilogues are the unfused ops up to summation order."""
    k, inter = 64, 80
    x = randn((2, 1, k), torch.float32, device, gen)
    wq, wk, bk = randn((64, k), torch.float32, device, gen), randn((16, k), torch.float32, device, gen), \
        randn((16,), torch.float32, device, gen)
    got = ops.gemv(x, [wq, wk], [None, bk])
    torch.testing.assert_close(got, torch.cat([x @ wq.T, x @ wk.T + bk], -1), rtol=1e-5, atol=1e-5)
    gate, up = randn((inter, k), torch.float32, device, gen), randn((inter, k), torch.float32, device, gen)
    torch.testing.assert_close(ops.gemv_act_and_mul(x, gate, up),
                               ops.silu_and_mul(x @ gate.T, x @ up.T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_are_named(device, gen):
    x = randn((2, 64), torch.float32, device, gen)
    w = randn((32, 64), torch.float32, device, gen)
    cases = [
        (lambda: ops.gemv(randn((0, 64), torch.float32, device, gen), [w]), "at least one row"),
        (lambda: ops.gemv(x, [randn((32, 63), torch.float32, device, gen)]), "x's last dimension"),
        (lambda: ops.gemv(x, [w.half()]), "dtype"),
        (lambda: ops.gemv(x, [w.T.contiguous().T]), "contiguous"),
        (lambda: ops.gemv(x.T.contiguous().T, [w]), "x must be contiguous"),
        (lambda: ops.gemv(x, [w], [randn((31,), torch.float32, device, gen)]), "biases[0]"),
        (lambda: ops.gemv(x, [w], []), "one entry"),
        (lambda: ops.gemv(x, [w] * 5), "1 to 4 weights"),
        (lambda: ops.gemv_act_and_mul(x, w, w[:16]), "same out_features"),
        (lambda: ops.gemv_act_and_mul(x, w, w, "relu"), "'silu' or 'gelu'"),
        (lambda: ops.gemv_act_and_mul(x, w, w, "gelu", approximate="fast"), "'none' or 'tanh'"),
    ]
    if device == "cuda":
        cases.append((lambda: ops.gemv(randn((5, 64), torch.float32, device, gen), [w]), "1 to 4 rows"))
    for call, words in cases:
        with pytest.raises((RuntimeError, ValueError), match=words.replace("[", r"\[").replace("]", r"\]")):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_prologues_are_named_before_any_write(device, gen):
    x = randn((2, 64), torch.float32, device, gen)
    w = randn((32, 64), torch.float32, device, gen)
    nw = randn((64,), torch.float32, device, gen)
    out = randn((2, 64), torch.float32, device, gen)
    before = out.clone()

    def prologue(**kw):
        return ops.NormPrologue(**{"weight": nw, "eps": 1e-6, "residual_out": out, **kw})

    cases = [
        (prologue(weight=nw[:63]), "norm_weight must be a contiguous [64]"),
        (prologue(weight=nw.half()), "norm_weight has dtype"),
        (prologue(eps=-1.0), "eps must be finite and >= 0"),
        (prologue(add=x[:1]), "add must have x's shape"),
        (prologue(residual_out=x), "residual_out must not share memory with x"),
        (prologue(add=out), "residual_out must not share memory with add"),
        (prologue(residual_out=out.T.contiguous().T), "residual_out must be contiguous"),
        (prologue(residual_out=out[:1]), "residual_out must have x's shape"),
    ]
    for norm, words in cases:
        for call in (lambda: ops.gemv(x, [w], norm=norm), lambda: ops.gemv_act_and_mul(x, w, w, norm=norm)):
            with pytest.raises(RuntimeError, match=words.replace("[", r"\[").replace("]", r"\]")):
                call()
            assert torch.equal(out, before), "a rejected call wrote residual_out"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_needs_whole_vectors_and_gemv_supports_says_so(gen):
    x = randn((1, 60), torch.bfloat16, "cuda", gen)  # 60 bf16 = 7.5 vectors of 16 bytes
    w = randn((8, 60), torch.bfloat16, "cuda", gen)
    assert not ops.gemv_supports(x, w)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.gemv(x, [w])
    x64, w64 = randn((1, 64), torch.bfloat16, "cuda", gen), randn((8, 64), torch.bfloat16, "cuda", gen)
    shifted = w64.view(-1)[1:1 + 7 * 64].view(7, 64)  # contiguous, 2 bytes off a 16-byte boundary
    assert ops.gemv_supports(x64, w64) and not ops.gemv_supports(x64, shifted)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ops.gemv(x64, [shifted])
    # x's rows live in shared memory: beyond GEMV_MAX_X_BYTES it is a matrix product's job
    wide = randn((4, ops.GEMV_MAX_X_BYTES // 8), torch.float32, "cuda", gen)
    ww = randn((8, wide.shape[1]), torch.float32, "cuda", gen)
    assert ops.gemv_supports(wide[:2], ww) and not ops.gemv_supports(wide, ww)
    with pytest.raises(RuntimeError, match="shared memory"):
        ops.gemv(wide, [ww])


def test_gemv_supports_rows_dtypes_and_layouts(gen):
    x = randn((4, 1, 32), torch.float32, "cpu", gen)
    w = randn((8, 32), torch.float32, "cpu", gen)
    assert ops.gemv_supports(x, w, w)
    assert ops.gemv_supports(randn((17, 32), torch.float32, "cpu", gen), w)  # the CPU kernel takes any rows
    assert not ops.gemv_supports(x, w.double())
    assert not ops.gemv_supports(x, w.T.contiguous().T)
    assert not ops.gemv_supports(x, randn((8, 31), torch.float32, "cpu", gen))
    assert not ops.gemv_supports(x.transpose(0, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_is_computed_alike_however_many_rows_share_the_call(device, dtype, gen):
    """Speculative verification's exactness: each row of an n-row call equals, bit for bit, the call
    holding that row alone (K with a tail past the last 16-lane block on the CPU; norm prologue too)."""
    k = 200 if device == "cpu" else 256
    n = 11 if device == "cpu" else ops.GEMV_MAX_ROWS
    x, add = randn((n, k), dtype, device, gen), randn((n, k), dtype, device, gen)
    ws = [randn((m, k), dtype, device, gen, scale=k ** -0.5) for m in (48, 16 if device == "cuda" else 17)]
    bias = randn((ws[1].shape[0],), dtype, device, gen)
    nw = randn((k,), dtype, device, gen, scale=0.5) + 1
    gate, up = (randn((40 if device == "cuda" else 41, k), dtype, device, gen, scale=k ** -0.5) for _ in range(2))
    res_all = torch.empty_like(x)
    calls = [
        lambda rows, res: ops.gemv(rows, ws, [None, bias]),
        lambda rows, res: ops.gemv_act_and_mul(rows, gate, up),
        lambda rows, res: ops.gemv_act_and_mul(rows, gate, up, "gelu", approximate="tanh"),
        lambda rows, res: ops.gemv(rows, ws, norm=ops.NormPrologue(nw, 1e-6, add=add[res], residual_out=res_all[res])),
    ]
    for i, call in enumerate(calls):
        together = call(x, slice(0, n))
        for r in range(n):
            alone = call(x[r:r + 1], slice(r, r + 1))
            assert torch.equal(together[r:r + 1], alone), f"call {i}: row {r} of {n} differs from the row alone"
