"""decode_attention_kv_codec: attention of T new tokens over K, V held as codec blocks (host KV on the
CPU) equals, bit for bit, decode_attention over the decoded K, V (the same kernel reads the decoded
tile), and the float64 reference within tolerance; blocks that spilled, and a spill the pool lost
(NaN, never another number), included; bad arguments named before any work."""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import reference

from ..conftest import TOLERANCE, rel_err
from .test_kv_codec import kv_like

pytestmark = pytest.mark.skipif(not ops.has_kernel("decode_attention_kv_codec", "CPU"),
                                reason="the compiled extension is not loaded")


def encoded_cache(b, hkv, cap, d, dtype, gen, spill_blocks=-1, loud_rows=()):
    """K, V [b, hkv, cap, d] real-looking (rows in loud_rows with every exponent: their blocks spill) and
    their encodings, each with the table and escape capacity calibrated on its first 64 positions."""
    k, v = kv_like((b, hkv, cap, d), dtype, gen), kv_like((b, hkv, cap, d), dtype, gen)
    span = 30 if dtype == torch.bfloat16 else 4  # decades, inside the dtype's range
    for r in loud_rows:
        k[:, :, r] = (torch.randn(b, hkv, d, generator=gen) * torch.logspace(-span, span, d)).to(dtype)
    cal = [ops.kv_calibrate(x[:, :, :64]) for x in (k, v)]
    enc = [ops.kv_encode(x, c.table, escape_capacity=c.escape_capacity, spill_blocks=spill_blocks)
           for x, c in zip((k, v), cal)]
    return k, v, enc[0], enc[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 40])  # 40: the kernel's any-head-dim path
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("split_keys", [0, 256])
def test_equals_decode_attention_on_the_decoded_kv_bit_for_bit(dtype, d, t, split_keys, gen):
    b, hq, hkv, cap = 2, 4, 2, 600  # 600: the last block of each stream is short
    k, v, ek, ev = encoded_cache(b, hkv, cap, d, dtype, gen, loud_rows=(70, 71, 333))
    assert ek.stats().spilled_blocks > 0
    q = torch.randn(b, hq, t, d, generator=gen).to(dtype)
    seq_lens = torch.tensor([cap, cap - 123], dtype=torch.int32)
    starts = torch.tensor([0, 17], dtype=torch.int32)
    got = ops.decode_attention_kv_codec(q, ek, ev, seq_lens, starts, split_keys=split_keys)
    kd, vd = ek.decode(), ev.decode()
    assert torch.equal(kd.view(torch.int16), k.view(torch.int16))
    # the same kernel over the decoded rows, in a cache of the blocks' capacity (split pieces follow it)
    rows = ek.blocks.shape[2] * ek.layout.block_rows
    kc = torch.zeros(b, hkv, rows, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    kc[:, :, :cap], vc[:, :, :cap] = kd, vd
    want = ops.decode_attention(q, kc, vc, seq_lens, starts, split_keys=split_keys)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    exact = reference.decode_attention(q.double(), k.double(), v.double(), seq_lens, starts)
    assert rel_err(got[0], exact[0]) <= TOLERANCE[dtype]


def test_a_lost_spill_reads_as_nan_never_another_number(gen):
    b, hkv, cap, d = 1, 1, 256, 64
    k, v, ek, ev = encoded_cache(b, hkv, cap, d, torch.bfloat16, gen, spill_blocks=0, loud_rows=(100,))
    assert ek.stats().lost_blocks > 0  # the block of rows 96..111 was not stored
    q = torch.randn(b, 2, 1, d, generator=gen).to(torch.bfloat16)
    before = ops.decode_attention_kv_codec(q, ek, ev, torch.tensor([96], dtype=torch.int32))
    assert torch.isfinite(before[0]).all()  # the keys before the lost block decode exactly
    lens = torch.tensor([cap], dtype=torch.int32)
    after = ops.decode_attention_kv_codec(q, ek, ev, lens)
    want = ops.decode_attention(q, ek.decode(), ev.decode(), lens)
    assert torch.isnan(after[0]).any()
    torch.testing.assert_close(after, want, rtol=0, atol=0, equal_nan=True)


def test_bad_arguments_are_named_before_any_work(gen):
    b, hkv, cap, d = 1, 2, 64, 64
    _, _, ek, ev = encoded_cache(b, hkv, cap, d, torch.bfloat16, gen)
    q = torch.randn(b, 4, 1, d, generator=gen).to(torch.bfloat16)
    lens = torch.tensor([cap], dtype=torch.int32)
    op = torch.ops.chunkinfer.decode_attention_kv_codec

    def args(**kw):
        a = dict(q=q, k_blocks=ek.blocks, k_spill=ek.spill, k_table=ek.table, v_blocks=ev.blocks, v_spill=ev.spill,
                 v_table=ev.table, seq_lens=lens, k_escape_capacity=ek.layout.escape_capacity,
                 v_escape_capacity=ev.layout.escape_capacity)
        a.update(kw)
        return a

    cases = [
        (args(q=q.float()), "q must be bfloat16 or float16"),
        (args(q=q[0]), r"q must be \[B, Hq, T, D\]"),
        (args(k_blocks=ek.blocks[..., :-16]), "k_blocks must be a contiguous"),
        (args(v_blocks=ev.blocks[:, :1]), "v_blocks must have k_blocks' heads and blocks"),
        (args(v_table=ev.table[:8]), "v_table must be a contiguous"),
        (args(v_escape_capacity=ev.layout.escape_capacity + 4), "v_blocks must be a contiguous"),
        (args(k_spill=ek.spill.view(-1)), "k_spill must be a contiguous"),
        (args(q=torch.randn(b, 3, 1, d).to(torch.bfloat16)), "multiple of the kv heads"),
        (args(seq_lens=lens.long()), "seq_lens must be int32"),
    ]
    op(**args())  # the unchanged arguments run
    for a, words in cases:
        with pytest.raises(RuntimeError, match=words):
            op(**a)
    with pytest.raises(ValueError, match="q is torch.float16"):
        ops.decode_attention_kv_codec(q.half(), ek, ev, lens)
    with pytest.raises(ValueError, match="must share dtype, head dim, block_rows and blocks"):
        ops.decode_attention_kv_codec(q, ek, ops.kv_encode(ev.decode()[:, :, :32], ev.table), lens)
