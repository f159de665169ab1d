"""The lossless KV codec: decode(encode(x)) is x bit for bit (int16 patterns compared), the CPU kernel's
bytes equal the plain-PyTorch reference's, and the CUDA kernel (marked cuda) decodes the same.

Inputs: random words (every exponent, NaN, inf, denormals, -0), real-looking K/V (normal, a few
outliers, one loud channel), all-escape blocks (spilled, and lost when the pool is full), odd shapes,
strided streams (a cache slice), both dtypes.
"""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import kv_codec, reference

from ..conftest import DEVICES

pytestmark = pytest.mark.skipif(not ops.has_kernel("kv_encode_out", "CPU"),
                                reason="the compiled extension is not loaded")

DTYPES = [torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def random_words(shape, dtype, gen) -> torch.Tensor:
    """Every 16-bit pattern equally likely: all exponents (so mostly escapes), NaNs, infs, denormals."""
    return torch.randint(-(2 ** 15), 2 ** 15, shape, generator=gen, dtype=torch.int32).to(torch.int16).view(dtype)


def kv_like(shape, dtype, gen) -> torch.Tensor:
    """Real-looking K/V rows: normal values, one loud channel, a few outliers far out."""
    x = torch.randn(shape, generator=gen) * 0.7
    x[..., min(3, shape[-1] - 1)] *= 40.0
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=gen)
    flat[idx] *= torch.empty(idx.numel()).uniform_(50, 500, generator=gen)
    return x.to(dtype)


def specials(shape, dtype) -> torch.Tensor:
    """NaN, +-inf, denormals, +-0 and the extremes of the dtype, repeated."""
    info = torch.finfo(dtype)
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4,
                         -info.tiny / 8, info.max, -info.max, info.eps, 1.0, -2.0], dtype=torch.float32).to(dtype)
    n = torch.Size(shape).numel()
    return vals.repeat(n // vals.numel() + 1)[:n].view(shape)


def table_for(x: torch.Tensor) -> torch.Tensor:
    return ops.kv_calibrate(x.cpu()).table.to(x.device)


def round_trip(x: torch.Tensor, table: torch.Tensor, **kw) -> ops.KVEncoded:
    enc = ops.kv_encode(x, table, **kw)
    assert torch.equal(bits(enc.decode()), bits(x)), "decode(encode(x)) is not x bit for bit"
    return enc


# ---- CPU kernel against the reference, byte for byte ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", ["random", "kv_like", "specials"])
@pytest.mark.parametrize("shape,block_rows,cap", [((2, 3, 40, 64), 16, 16), ((1, 1, 5, 7), 4, 0),
                                                  ((3, 33, 128), 16, 8), ((17, 24), 3, 4)])
def test_cpu_bytes_equal_reference_and_round_trip(dtype, make, shape, block_rows, cap, gen):
    x = {"random": lambda: random_words(shape, dtype, gen), "kv_like": lambda: kv_like(shape, dtype, gen),
         "specials": lambda: specials(shape, dtype)}[make]()
    table = table_for(x)
    enc = round_trip(x, table, block_rows=block_rows, escape_capacity=cap)
    blocks, spill, used = reference.kv_encode(x, table, block_rows, cap)
    assert torch.equal(enc.blocks, blocks)
    assert torch.equal(enc.spill_used, used)
    n = int(used)
    assert torch.equal(enc.spill[:n], spill[:n])
    ref = reference.kv_decode(blocks, spill, table, x.shape[-2], x.shape[-1], dtype, block_rows, cap)
    assert torch.equal(bits(ref), bits(x)), "the reference does not round-trip"


def test_layout_matches_the_kernel():
    for dtype, d, rows, cap in [(torch.bfloat16, 128, 16, 16), (torch.float16, 64, 16, 8), (torch.bfloat16, 7, 3, 0)]:
        x = torch.zeros(2, 5, d, dtype=dtype)
        lay = ops.KVCodecLayout(dtype, d, rows, cap)
        enc = ops.kv_encode(x, table_for(x), block_rows=rows, escape_capacity=cap)
        assert enc.blocks.shape == (2, lay.num_blocks(5), lay.slot_bytes)
        assert enc.spill.shape == (2 * lay.num_blocks(5), lay.spill_unit_bytes)
        assert lay.slot_bytes % 16 == 0 and lay.codes_offset % 16 == 0 and lay.escape_offset % 16 == 0
    bf = ops.KVCodecLayout(torch.bfloat16, 128, 16, 16)
    assert bf.slot_bytes == 16 + 2048 + 1024 + 64  # header, rest bytes, 4-bit codes, 16 escape entries


# ---- what the format promises ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_looking_kv_compresses_and_round_trips(device, dtype, gen):
    x = kv_like((2, 4, 256, 128), dtype, gen).to(device)
    cal = ops.kv_calibrate(x.cpu())
    enc = round_trip(x, cal.table.to(device), escape_capacity=cal.escape_capacity)
    st = enc.stats()
    assert st.lost_blocks == 0
    want = 1.25 if dtype == torch.bfloat16 else 1.0  # 12 of 16 bits (bf16), 15 of 16 (fp16), before costs
    assert st.ratio > want, st
    assert abs(st.ratio - cal.ratio) < 1e-9, "calibrate's measured ratio is the encoder's"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_escape_blocks_spill_with_a_bounded_size(device, dtype, gen):
    x = random_words((3, 64, 64), dtype, gen).to(device)
    table = torch.full((16,), 255, dtype=torch.uint8, device=device)  # matches no fp16 exponent, one bf16 one
    if dtype == torch.bfloat16:
        x = torch.where(((bits(x) >> 7) & 0xFF) == 255, torch.zeros_like(x), x)  # no element codes
    enc = round_trip(x, table, escape_capacity=4)
    st = enc.stats()
    lay = enc.layout
    assert st.spilled_blocks == st.blocks == 3 * 4 and st.lost_blocks == 0
    assert int(enc.spill_used) == st.blocks
    assert st.stored_bytes == st.blocks * lay.worst_case_block_bytes
    per_element = 2.5 if dtype == torch.bfloat16 else 2.875  # rest + code + spilled exponent (+ fp16's 3 bits)
    assert st.stored_bytes <= st.blocks * (per_element * lay.padded_elems + 16 + 4 * lay.escape_capacity)
    assert per_element * lay.padded_elems / lay.raw_block_bytes <= (1.25 if dtype == torch.bfloat16 else 1.44)


@pytest.mark.parametrize("device", DEVICES)
def test_full_spill_pool_loses_blocks_loudly_and_writes_nothing_outside(device, gen):
    x = random_words((2, 48, 32), torch.bfloat16, gen).to(device)
    table = table_for(kv_like((4, 32), torch.bfloat16, gen)).to(device)
    lay = ops.KVCodecLayout(torch.bfloat16, 32, 16, 0)
    blocks = torch.empty(2, 3, lay.slot_bytes, dtype=torch.uint8, device=device)
    pool = torch.full((4, lay.spill_unit_bytes), 0xAB, dtype=torch.uint8, device=device)
    spill, guard = pool[:2], pool[2:]  # a 2-unit pool; the rest must stay untouched
    used = torch.zeros(1, dtype=torch.int32, device=device)
    ops.kv_encode_into(blocks, spill, used, x, table, block_rows=16, escape_capacity=0)
    assert int(used) == 6, "the counter counts every spilled block, stored or not"
    assert (guard == 0xAB).all(), "wrote past the spill pool"
    st = kv_codec.codec_stats(blocks, lay, 48)
    assert st.spilled_blocks == 6 and st.lost_blocks == 4
    out = ops.kv_decode(blocks, spill, table, lay, 48)
    _, field = kv_codec.block_headers(blocks)
    kept = (field < 2).view(2, 3)
    for s in range(2):
        for b in range(3):
            rows = slice(16 * b, 16 * b + 16)
            if kept[s, b]:
                assert torch.equal(bits(out[s, rows]), bits(x[s, rows]))
            else:
                assert out[s, rows].isnan().all(), "a lost block must decode to NaN, never to numbers"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_slices_and_appending_to_one_pool(device, dtype, gen):
    """Encode rows [16, 48) of a [B, H, cap, D] cache into a block range of preallocated blocks (strided
    streams on both sides), twice into one spill pool, and decode back into a strided slice."""
    cache = kv_like((2, 3, 80, 64), dtype, gen).to(device)
    cache[0, 1, 20:30] = random_words((10, 64), dtype, gen).to(device)  # a block that spills
    table = table_for(cache[:, :, :16])
    lay = ops.KVCodecLayout(dtype, 64, 16, 8)
    blocks = torch.zeros(2, 3, 5, lay.slot_bytes, dtype=torch.uint8, device=device)
    spill = torch.zeros(8, lay.spill_unit_bytes, dtype=torch.uint8, device=device)
    used = torch.zeros(1, dtype=torch.int32, device=device)
    ops.kv_encode_into(blocks[:, :, 1:3], spill, used, cache[:, :, 16:48], table, block_rows=16, escape_capacity=8)
    first = int(used)
    assert first >= 1
    ops.kv_encode_into(blocks[:, :, 3:5], spill, used, cache[:, :, 48:80], table, block_rows=16, escape_capacity=8)
    assert int(used) >= first
    out = torch.full((2, 3, 80, 64), float("nan"), dtype=dtype, device=device)
    ops.kv_decode(blocks[:, :, 1:5], spill, table, lay, 64, out=out[:, :, 16:80])
    assert torch.equal(bits(out[:, :, 16:]), bits(cache[:, :, 16:]))
    assert out[:, :, :16].isnan().all(), "decoded outside the slice"
    assert (blocks[:, :, 0] == 0).all(), "encoded outside the block range"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_rows", [((1, 1, 1), 16), ((5, 3), 2), ((2, 37, 129), 16), ((1, 7, 31, 9), 5)])
def test_odd_sizes_round_trip(device, dtype, shape, block_rows, gen):
    x = kv_like(shape, dtype, gen).to(device)
    table = table_for(x)
    round_trip(x, table, block_rows=block_rows, escape_capacity=4)
    buf = torch.empty(2 * x.numel() + 1, dtype=dtype, device=device)  # views 2 bytes past 16-byte alignment
    shifted_x, shifted_out = buf[1:x.numel() + 1].view(shape), buf[x.numel() + 1:].view(shape)
    shifted_x.copy_(x)
    enc = ops.kv_encode(shifted_x, table, block_rows=block_rows, escape_capacity=4)
    enc.decode(out=shifted_out)
    assert torch.equal(bits(shifted_out), bits(x))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_specials(device):
    for dtype in DTYPES:
        e = ops.kv_encode(torch.empty(2, 0, 64, dtype=dtype, device=device), torch.zeros(16, dtype=torch.uint8,
                                                                                         device=device))
        assert e.blocks.shape == (2, 0, ops.KVCodecLayout(dtype, 64).slot_bytes) and e.decode().shape == (2, 0, 64)
        x = specials((4, 33, 16), dtype).to(device)
        round_trip(x, table_for(x), escape_capacity=0)
        neg_zero = torch.full((1, 16, 8), -0.0, dtype=dtype, device=device)
        assert torch.equal(bits(ops.kv_encode(neg_zero, table_for(neg_zero)).decode()), bits(neg_zero))


# ---- the GPU against the CPU ----

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_slots_equal_the_cpu(dtype, gen):
    """Every byte of every slot is the CPU's, except the spill index of spilled blocks (taken in an order
    that can vary on the GPU): their spilled exponent planes are compared through the indices."""
    x = kv_like((2, 4, 200, 128), dtype, gen)
    x[1, 2, 40:60] = random_words((20, 128), dtype, gen)
    table = table_for(x)
    cpu = ops.kv_encode(x, table, escape_capacity=8)
    gpu = ops.kv_encode(x.cuda(), table.cuda(), escape_capacity=8)
    assert int(gpu.spill_used) == int(cpu.spill_used) > 0
    gb, cb = gpu.blocks.cpu(), cpu.blocks
    assert torch.equal(gb[..., 8:], cb[..., 8:]) and torch.equal(gb[..., :4], cb[..., :4])
    _, gfield = kv_codec.block_headers(gb)
    _, cfield = kv_codec.block_headers(cb)
    spilled = cfield != kv_codec.NOT_SPILLED
    assert torch.equal(gfield == kv_codec.NOT_SPILLED, ~spilled)
    assert torch.equal(gpu.spill.cpu()[gfield[spilled]], cpu.spill[cfield[spilled]])
    assert torch.equal(bits(ops.kv_decode(cb.cuda(), cpu.spill.cuda(), table.cuda(), cpu.layout, 200).cpu()), bits(x))


# ---- schemas, fakes, errors ----

@pytest.mark.parametrize("name", list(ops.library.KV_CODEC_SCHEMAS))
def test_schema_matches_python(name):
    assert str(getattr(torch.ops.chunkinfer, name).default._schema) == "chunkinfer::" + ops.library.SCHEMAS[name]


def test_opcheck(gen):
    x = kv_like((2, 40, 64), torch.bfloat16, gen)
    table = table_for(x)
    torch.library.opcheck(torch.ops.chunkinfer.kv_encode.default, (x, table, 16, 8, -1))
    blocks, spill, used = torch.ops.chunkinfer.kv_encode(x, table, 16, 8, -1)
    torch.library.opcheck(torch.ops.chunkinfer.kv_decode.default, (blocks, spill, table, 40, 64, torch.bfloat16, 16, 8))
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.chunkinfer.kv_decode_out.default, (out, blocks, spill, table, 16, 8))
    torch.library.opcheck(torch.ops.chunkinfer.kv_encode_out.default,
                          (blocks.clone(), spill.clone(), torch.zeros(1, dtype=torch.int32), x, table, 16, 8))


def test_compile_traces_the_codec(gen):
    x = kv_like((2, 40, 64), torch.bfloat16, gen)
    table = table_for(x)

    def fn(x):
        blocks, spill, _ = torch.ops.chunkinfer.kv_encode(x, table, 16, 8, -1)
        return torch.ops.chunkinfer.kv_decode(blocks, spill, table, 40, 64, torch.bfloat16, 16, 8)

    torch._dynamo.reset()
    assert torch.equal(bits(torch.compile(fn, fullgraph=True, backend="aot_eager")(x)), bits(x))


@pytest.mark.parametrize("call,message", [
    (lambda x, t: ops.kv_encode(x.float(), t), "x must be bfloat16 or float16"),
    (lambda x, t: ops.kv_encode(x[0, 0], t), "x must be [..., rows, head_dim]"),
    (lambda x, t: ops.kv_encode(x.transpose(-1, -2), t), "x must have contiguous rows"),
    (lambda x, t: ops.kv_encode(x, t[:8]), "table must be a contiguous [16] uint8"),
    (lambda x, t: ops.kv_encode(x, t.int()), "table must be Byte"),
    (lambda x, t: ops.kv_encode(x, t, escape_capacity=6), "escape_capacity must be a multiple of 4"),
    (lambda x, t: ops.kv_encode(x, t, block_rows=0), "block_rows must be >= 1"),
    (lambda x, t: torch.ops.chunkinfer.kv_encode_out(torch.empty(2, 1, 9, dtype=torch.uint8),
                                                     torch.empty(0, 128, dtype=torch.uint8),
                                                     torch.zeros(1, dtype=torch.int32), x, t, 16, 16),
     "blocks must have shape [2, 1, "),
    (lambda x, t: torch.ops.chunkinfer.kv_decode(torch.empty(2, 1, 10, dtype=torch.uint8),
                                                 torch.empty(0, 128, dtype=torch.uint8), t, 8, 8, torch.bfloat16,
                                                 16, 16), "blocks must have shape"),
    (lambda x, t: torch.ops.chunkinfer.kv_decode(ops.kv_encode(x, t).blocks, torch.empty(1, 5, dtype=torch.uint8), t,
                                                 8, 8, torch.bfloat16, 16, 16),
     "spill must be a contiguous [capacity, 128]"),
    (lambda x, t: torch.ops.chunkinfer.kv_decode(ops.kv_encode(x, t).blocks, torch.empty(1, 128, dtype=torch.uint8), t,
                                                 8, 8, torch.float32, 16, 16), "dtype must be bfloat16 or float16"),
])
def test_bad_arguments_are_named(call, message):
    x = torch.randn(2, 8, 8).to(torch.bfloat16)
    with pytest.raises((RuntimeError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        call(x, table_for(x))


def test_calibration_reports_what_encoding_measures(gen):
    x = kv_like((4, 512, 64), torch.bfloat16, gen)
    cal = ops.kv_calibrate(x, block_rows=16)
    assert cal.table.dtype == torch.uint8 and cal.table.shape == (16,)
    enc = round_trip(x, cal.table, escape_capacity=cal.escape_capacity)
    st = enc.stats()
    assert st.ratio == pytest.approx(cal.ratio)
    assert st.escapes / x.numel() == pytest.approx(cal.escape_rate)
    assert st.spilled_blocks / st.blocks == pytest.approx(cal.spill_fraction)
    assert 1.3 < cal.entropy_bound_ratio < 2.0 and cal.exponent_entropy > 0
    # without headroom the capacity is the one that makes the sample smallest; the default adds 4 entries
    tight = ops.kv_calibrate(x, block_rows=16, escape_headroom=0)
    assert cal.escape_capacity == tight.escape_capacity + 4
    assert torch.equal(cal.table, tight.table)
    for cap in range(0, 64, 4):
        assert ops.kv_calibrate(x, escape_capacity=cap).ratio <= tight.ratio + 1e-12
    with pytest.raises(ValueError, match="sample must be"):
        ops.kv_calibrate(x.float())
