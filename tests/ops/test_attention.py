"""decode_attention and merge_attn_states against the float64 reference, on CPU and (marked cuda) GPU.

Inputs are fresh random numbers; cache positions outside [start, seq_len) hold NaN, so a kernel that
reads one fails; outputs are filled with NaN before each call, so one that skips an element fails.
"""
from __future__ import annotations

import math

import pytest
import torch

from chunkinfer import ops
from chunkinfer.ops import reference

HAS_CUDA = torch.cuda.is_available()
CPU = "cpu"
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])
DEVICES = [CPU, CUDA]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LSE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}

pytestmark = pytest.mark.skipif(not ops.has_kernel("decode_attention", "CPU"),
                                reason="the compiled extension is not loaded")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_cache(B, Hkv, cap, D, dtype, device, lens, starts, gen):
    """K, V [B, Hkv, cap, D] random where valid, NaN outside [start, len)."""
    k = torch.randn(B, Hkv, cap, D, generator=gen, dtype=torch.float32).to(dtype)
    v = torch.randn(B, Hkv, cap, D, generator=gen, dtype=torch.float32).to(dtype)
    for b in range(B):
        st = starts[b] if starts is not None else 0
        for t in (k, v):
            t[b, :, :st] = float("nan")
            t[b, :, lens[b]:] = float("nan")
    return k.to(device), v.to(device)


def run_case(device, dtype, *, B, Hq, Hkv, T, D, lens, starts=None, window=0, cap=None, scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cap = cap or max(lens) + 5
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype).to(device)
    k, v = make_cache(B, Hkv, cap, D, dtype, device, lens, starts, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    st = torch.tensor(starts, dtype=torch.int32, device=device) if starts is not None else None
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, T), float("nan"), device=device)
    ops.decode_attention(q, k, v, seq_lens, st, scale=scale, window=window, out=out, lse=lse)
    ref_out, ref_lse = reference.decode_attention(q.double(), k.double(), v.double(), seq_lens, st, scale, window)
    check(out, lse, ref_out, ref_lse, dtype)
    return out, lse, ref_out, ref_lse


def check(out, lse, ref_out, ref_lse, dtype):
    assert not out.isnan().any(), "an output element was not written (or is NaN)"
    assert not lse.isnan().any(), "an lse element was not written (or is NaN)"
    err = rel_err(out, ref_out)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "lse is -inf exactly where no key was seen"
    assert (lse[~seen] == float("-inf")).all()
    assert (out[~seen] == 0).all()
    if seen.any():
        lerr = (lse.double()[seen] - ref_lse[seen]).abs().max().item()
        assert lerr <= LSE_TOL[dtype], f"lse error {lerr:.3g}"


# ---- decode_attention ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [16, 64, 96, 128, 200, 256])  # 16, 96, 200: CUDA runs them as 64, 128, 256 with idle lanes
def test_decode_unequal_lengths_and_starts(device, dtype, D):
    run_case(device, dtype, B=3, Hq=8, Hkv=2, T=1, D=D, lens=[1, 7, 4097], starts=[0, 2, 1000])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("window", [0, 1, 5, 300])
def test_decode_new_tokens_and_sliding_window(device, dtype, T, window):
    run_case(device, dtype, B=2, Hq=4, Hkv=2, T=T, D=128, lens=[4097, 610], starts=[3, 0], window=window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Hq,Hkv,T", [(4, 4, 1), (6, 3, 1), (6, 2, 1), (8, 1, 1), (16, 2, 1), (32, 2, 1),
                                      (8, 2, 3), (16, 1, 2)])
def test_decode_gqa_groups(device, Hq, Hkv, T):
    run_case(device, torch.bfloat16, B=2, Hq=Hq, Hkv=Hkv, T=T, D=64, lens=[1500, 77], starts=[10, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_scale_and_tiny_lengths(device):
    run_case(device, torch.float32, B=4, Hq=4, Hkv=1, T=1, D=64, lens=[1, 2, 3, 7], scale=0.3, cap=16)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_no_keys_gives_zero_and_minus_inf(device):
    # batch 0: empty cache; batch 1: start == seq_len; batch 2: the query sits before the start
    out, lse, _, _ = run_case(device, torch.float32, B=3, Hq=2, Hkv=1, T=2, D=64, lens=[0, 9, 9],
                              starts=[0, 9, 9], cap=12)
    assert (lse == float("-inf")).all() and (out == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_strided_views(device):
    """q as HF's [B, T, H, D].transpose(1, 2), the cache a view into a larger [B, cap, Hkv, D] buffer."""
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, T, D, cap = 2, 8, 2, 2, 128, 3000
    q = torch.randn(B, T, Hq, D, generator=gen).to(torch.bfloat16).to(device).transpose(1, 2)
    big_k = torch.randn(B, cap + 64, Hkv + 1, D, generator=gen).to(torch.bfloat16).to(device)
    big_v = torch.randn(B, cap + 64, Hkv + 1, D, generator=gen).to(torch.bfloat16).to(device)
    k = big_k[:, :cap, 1:].transpose(1, 2)  # [B, Hkv, cap, D], strides (.., D, (Hkv+1)*D, 1)
    v = big_v[:, 8:cap + 8, :Hkv].transpose(1, 2)
    seq_lens = torch.tensor([2999, 1234], dtype=torch.int32, device=device)
    out_buf = torch.full((B, T, Hq, D), float("nan"), dtype=torch.bfloat16, device=device)
    out = out_buf.transpose(1, 2)
    lse = torch.full((B, T, Hq), float("nan"), device=device).transpose(1, 2)
    ops.decode_attention(q, k, v, seq_lens, out=out, lse=lse)
    ref_out, ref_lse = reference.decode_attention(q.double(), k.double(), v.double(), seq_lens)
    check(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_then_merge_equals_whole(device, dtype):
    """Attend [0, m) and [m, L) separately (through seq_lens and starts), merge, compare to [0, L)."""
    gen = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, L = 2, 8, 2, 128, 3001
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dtype).to(device)
    k, v = make_cache(B, Hkv, L, D, dtype, device, [L, L], None, gen)
    i32 = dict(dtype=torch.int32, device=device)
    whole_out, whole_lse = ops.decode_attention(q, k, v, torch.tensor([L, L], **i32))
    for m in (1, 1000, 3000):
        out_a, lse_a = ops.decode_attention(q, k, v, torch.tensor([m, m], **i32))
        out_b, lse_b = ops.decode_attention(q, k, v, torch.tensor([L, L], **i32), torch.tensor([m, m], **i32))
        out = torch.full_like(out_a, float("nan"))
        lse = torch.full_like(lse_a, float("nan"))
        ops.merge_attn_states(out_a, lse_a, out_b, lse_b, out=out, lse=lse)
        assert rel_err(out, whole_out) <= TOL[dtype] * 2
        assert (lse - whole_lse).abs().max().item() <= LSE_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 700])
@pytest.mark.parametrize("D", [128, 96])
def test_split_keys_rows_do_not_depend_on_the_step(device, dtype, window, D, gen):
    """With split_keys, each row of a T-token call equals, bit for bit, a one-token call at its position,
    whatever the capacity: the property speculative decoding's exactness rests on."""
    B, Hq, Hkv, T, L = 2, 8, 2, 6, 2900
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, 4096, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Hkv, 4096, D, generator=gen).to(dtype).to(device)
    starts = torch.tensor([0, 37], dtype=torch.int32, device=device)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    out, lse = ops.decode_attention(q, k, v, lens, starts, window=window, split_keys=256)
    ref, ref_lse = reference.decode_attention(q.double(), k.double(), v.double(), lens, starts, None, window)
    check(out, lse, ref, ref_lse, dtype)
    for t in range(T):
        cap = L - T + t + 1 + 256 * t  # another capacity for every row: the pieces do not move with it
        one, one_lse = ops.decode_attention(q[:, :, t:t + 1], k[:, :, :cap], v[:, :, :cap],
                                            torch.full((B,), L - T + t + 1, dtype=torch.int32, device=device),
                                            starts, window=window, split_keys=256)
        assert torch.equal(one[:, :, 0], out[:, :, t]) and torch.equal(one_lse[:, :, 0], lse[:, :, t]), t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_keys", [0, 256])
def test_ring_cache_matches_the_linear_one(device, dtype, split_keys, gen):
    """window > 0: key j at slot j % capacity, lengths past the capacity; the same attention as over a
    linear cache holding every position, and a T-token call's rows equal one-token calls on the ring."""
    B, Hq, Hkv, D, T, W, L = 2, 4, 2, 64, 5, 300, 2000
    cap = 512  # >= W - 1 + T
    full_k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    full_v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    ring_k = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype)
    ring_v = ring_k.clone()
    for p in range(L - cap, L):
        ring_k[:, :, p % cap], ring_v[:, :, p % cap] = full_k[:, :, p], full_v[:, :, p]
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype).to(device)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    out, lse = ops.decode_attention(q, ring_k.to(device), ring_v.to(device), lens, window=W, split_keys=split_keys)
    ref, ref_lse = reference.decode_attention(q.double(), full_k.double().to(device), full_v.double().to(device), lens,
                                              None, None, W)
    check(out, lse, ref, ref_lse, dtype)
    if split_keys:
        for t in range(T):
            one, _ = ops.decode_attention(q[:, :, t:t + 1], ring_k.to(device), ring_v.to(device),
                                          torch.full((B,), L - T + t + 1, dtype=torch.int32, device=device),
                                          window=W, split_keys=split_keys)
            assert torch.equal(one[:, :, 0], out[:, :, t]), t


@pytest.mark.parametrize("bad", [100, -256])
def test_split_keys_must_be_a_multiple_of_256(bad):
    q = torch.randn(1, 2, 1, 64)
    k = torch.randn(1, 2, 300, 64)
    with pytest.raises(RuntimeError, match="split_keys must be 0 or a positive multiple of 256"):
        ops.decode_attention(q, k, k, torch.tensor([10], dtype=torch.int32), split_keys=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_long_cuda(dtype):
    run_case("cuda", dtype, B=2, Hq=32, Hkv=8, T=1, D=128, lens=[131072, 100_003], starts=[0, 517],
             cap=131072 + 64)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 2])
def test_cuda_graph_replay_after_cache_grew(T):
    """Capture once at one length; grow seq_lens (and move starts) on the device; replay == eager."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, cap = 2, 32, 8, 128, 16384
    dev = "cuda"
    q = torch.randn(B, Hq, T, D, generator=gen).to(torch.bfloat16).to(dev)
    k, v = make_cache(B, Hkv, cap, D, torch.bfloat16, dev, [cap, cap], None, gen)
    seq_lens = torch.tensor([100, 37], dtype=torch.int32, device=dev)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as capture requires
        ops.decode_attention(q, k, v, seq_lens, starts, window=4000, out=out, lse=lse)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode_attention(q, k, v, seq_lens, starts, window=4000, out=out, lse=lse)
    for lens, firsts in (([100, 37], [0, 5]), ([9000, 16384], [1, 300]), ([16384, 2], [16000, 0])):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        starts.copy_(torch.tensor(firsts, dtype=torch.int32))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        eager_out, eager_lse = ops.decode_attention(q, k, v, seq_lens, starts, window=4000)
        torch.cuda.synchronize()
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
        ref_out, ref_lse = reference.decode_attention(q.double(), k.double(), v.double(), seq_lens, starts, None, 4000)
        check(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 3])
def test_prefix_ready_after_the_new_tokens_are_written(T):
    """The decode step's order: rotary_kv_write puts the new tokens' K, V at [len - T, len) (that
    kernel lets the next one start at once), then the attention with prefix_ready loads older keys
    before the write has finished. The new positions hold NaN until the write, so loading one early
    poisons the output; prefix_ready changes when keys are loaded, never the result."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D, cap, dev = 2, 32, 8, 128, 8192, "cuda"
    k, v = make_cache(B, Hkv, cap, D, torch.bfloat16, dev, [cap, cap], None, gen)
    theta = torch.rand(1, T, D // 2, generator=gen) * 6.0
    cos = torch.cat([theta.cos(), theta.cos()], -1).to(torch.bfloat16).to(dev)
    sin = torch.cat([-theta.sin(), theta.sin()], -1).to(torch.bfloat16).to(dev)
    q_new = torch.randn(B, T, Hq, D, generator=gen).to(torch.bfloat16).to(dev)
    k_new = torch.randn(B, T, Hkv, D, generator=gen).to(torch.bfloat16).to(dev)
    v_new = torch.randn(B, T, Hkv, D, generator=gen).to(torch.bfloat16).to(dev)
    for length in (T, 700, 5000, cap):
        index = torch.arange(length - T, length, device=dev)
        seq_lens = torch.full((B,), length, dtype=torch.int32, device=dev)
        outs = []
        for ready in (True, False, True):
            k[:, :, length - T:length] = float("nan")
            v[:, :, length - T:length] = float("nan")
            q = q_new.clone()
            ops.rotary_kv_write(q, k_new, v_new, cos, sin, k, v, index)
            outs.append(ops.decode_attention(q.transpose(1, 2), k, v, seq_lens, prefix_ready=ready))
        for out, lse in outs[1:]:
            assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
        ref_out, ref_lse = reference.decode_attention(q.transpose(1, 2).double(), k.double(), v.double(), seq_lens)
        check(*outs[0], ref_out, ref_lse, torch.bfloat16)


# ---- merge_attn_states ----

def merge_inputs(device, dtype, shape=(2, 4, 3, 64), seed=4):
    gen = torch.Generator().manual_seed(seed)
    out_a = torch.randn(*shape, generator=gen).to(dtype)
    out_b = torch.randn(*shape, generator=gen).to(dtype)
    lse_a = torch.randn(*shape[:-1], generator=gen) * 3
    lse_b = torch.randn(*shape[:-1], generator=gen) * 3
    flat_a, flat_b = lse_a.view(-1), lse_b.view(-1)
    flat_a[0] = float("-inf")  # a segment that saw nothing: its out must not matter
    out_a.view(-1, shape[-1])[0] = float("nan")
    flat_b[1] = float("-inf")
    out_b.view(-1, shape[-1])[1] = float("nan")
    flat_a[2] = flat_b[2] = float("-inf")  # neither saw anything
    out_a.view(-1, shape[-1])[2] = float("nan")
    flat_a[3] = float("inf")
    flat_a[4] = flat_b[4] = 80.0  # large but equal
    flat_b[5] = -80.0
    return [t.to(device) for t in (out_a, lse_a, out_b, lse_b)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 96, 7])
def test_merge_matches_reference(device, dtype, D):
    out_a, lse_a, out_b, lse_b = merge_inputs(device, dtype, shape=(2, 4, 3, D))
    out = torch.full_like(out_a, float("nan"))
    lse = torch.full_like(lse_a, float("nan"))
    ops.merge_attn_states(out_a, lse_a, out_b, lse_b, out=out, lse=lse)
    ref_out, ref_lse = reference.merge_attn_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    assert torch.equal(lse[~torch.isfinite(lse)], ref_lse[~torch.isfinite(ref_lse)].float())
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max().item() <= 1e-5
    rows = out.view(-1, D)
    assert (rows[2] == 0).all() and lse.view(-1)[2] == float("-inf")


@pytest.mark.parametrize("device", DEVICES)
def test_merge_in_place_and_strided(device):
    out_a, lse_a, out_b, lse_b = merge_inputs(device, torch.bfloat16, shape=(3, 5, 128))
    ref_out, ref_lse = ops.merge_attn_states(out_a, lse_a, out_b, lse_b)
    ops.merge_attn_states(out_a, lse_a, out_b, lse_b, out=out_a, lse=lse_a)  # in place
    assert torch.equal(out_a, ref_out) and torch.equal(lse_a, ref_lse)
    # rows inside wider buffers (row stride > D, lse every other element)
    wide_b = torch.full((3, 5, 256), float("nan"), dtype=out_b.dtype, device=device)
    wide_b[..., :128] = out_b
    wide_lse = torch.full((3, 10), float("nan"), device=device)
    wide_lse[:, ::2] = lse_b
    out2, lse2 = ops.merge_attn_states(ref_out, ref_lse, wide_b[..., :128], wide_lse[:, ::2])
    out3, lse3 = ops.merge_attn_states(ref_out, ref_lse, out_b, lse_b)
    assert torch.equal(out2, out3) and torch.equal(lse2, lse3)
    # leading dims that do not flatten to rows are refused, not copied
    with pytest.raises(RuntimeError, match="does not flatten to rows"):
        ops.merge_attn_states(ref_out, ref_lse, out_b.transpose(0, 1).contiguous().transpose(0, 1), lse_b)


# ---- schemas, opcheck, errors ----

@pytest.mark.parametrize("name", ["decode_attention", "decode_attention_out", "merge_attn_states",
                                  "merge_attn_states_out"])
def test_schema_matches_python(name):
    assert str(getattr(torch.ops.chunkinfer, name).default._schema) == "chunkinfer::" + ops.library.SCHEMAS[name]


def opcheck_args(device):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 2, 64, generator=gen).to(torch.bfloat16).to(device)
    k = torch.randn(2, 2, 40, 64, generator=gen).to(torch.bfloat16).to(device)
    v = torch.randn(2, 2, 40, 64, generator=gen).to(torch.bfloat16).to(device)
    lens = torch.tensor([40, 13], dtype=torch.int32, device=device)
    starts = torch.tensor([0, 3], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    lse = torch.empty(2, 4, 2, device=device)
    oa, la, ob, lb = merge_inputs(device, torch.bfloat16)
    return {
        "decode_attention": (q, k, v, lens, starts, 0.2, 7),
        "decode_attention_out": (out, lse, q, k, v, lens, None, None, 0),
        "merge_attn_states": (oa, la, ob, lb),
        "merge_attn_states_out": (torch.empty_like(oa), torch.empty_like(la), oa, la, ob, lb),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["decode_attention", "decode_attention_out", "merge_attn_states",
                                  "merge_attn_states_out"])
def test_opcheck(device, name):
    torch.library.opcheck(getattr(torch.ops.chunkinfer, name).default, opcheck_args(device)[name])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_bad_inputs(device):
    q = torch.randn(1, 4, 1, 64, device=device)
    k = torch.randn(1, 2, 16, 64, device=device)
    lens = torch.tensor([8], dtype=torch.int32, device=device)
    da = ops.decode_attention
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16"):
        da(q.to(torch.int32), k, k, lens)
    with pytest.raises(RuntimeError, match="k_cache has dtype Half but q has dtype Float"):
        da(q, k.half(), k, lens)
    with pytest.raises(RuntimeError, match=r"query heads \(3\) must be a multiple of the kv heads \(2\)"):
        da(q[:, :3], k, k, lens)
    with pytest.raises(RuntimeError, match="head dim 32 but q has head dim 64"):
        da(q, k[..., :32], k[..., :32], lens)
    with pytest.raises(RuntimeError, match="v_cache must have k_cache's shape"):
        da(q, k, k[:, :, :8], lens)
    with pytest.raises(RuntimeError, match="seq_lens must be int32"):
        da(q, k, k, lens.long())
    with pytest.raises(RuntimeError, match=r"seq_lens must have shape \[1\]"):
        da(q, k, k, lens.repeat(2))
    with pytest.raises(RuntimeError, match="starts must be int32"):
        da(q, k, k, lens, lens.float())
    with pytest.raises(RuntimeError, match="q must be \\[B, Hq, T, D\\]"):
        da(q[0], k, k, lens)
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        da(q, torch.randn(1, 2, 64, 16, device=device).transpose(2, 3), k, lens)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        da(q, k, k, lens, out=torch.empty_like(q), lse=torch.empty(1, 4, 1, dtype=torch.float16, device=device))
    with pytest.raises(RuntimeError, match="out must have q's shape"):
        da(q, k, k, lens, out=torch.empty(1, 4, 2, 64, device=device), lse=torch.empty(1, 4, 1, device=device))
    with pytest.raises(ValueError, match="both out and lse"):
        da(q, k, k, lens, out=torch.empty_like(q))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="seq_lens must be on q's device"):
            da(q, k, k, lens.cpu())
        with pytest.raises(RuntimeError, match="head dim 20 is not supported on CUDA"):
            da(q[..., :20].contiguous(), k[..., :20].contiguous(), k[..., :20].contiguous(), lens)
        flat = torch.randn(2 * 16 * 64 + 1, device=device)
        odd = flat[1:].view(1, 2, 16, 64)  # 4-byte offset: no 16-byte loads
        with pytest.raises(RuntimeError, match="16-byte aligned"):
            da(q, odd, k, lens)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_bad_inputs(device):
    oa, la, ob, lb = merge_inputs(device, torch.float32)
    ma = ops.merge_attn_states
    with pytest.raises(RuntimeError, match="out_b has dtype"):
        ma(oa, la, ob.half(), lb)
    with pytest.raises(RuntimeError, match="out_b must have out_a's shape"):
        ma(oa, la, ob[:1], lb)
    with pytest.raises(RuntimeError, match="lse_b must be float32"):
        ma(oa, la, ob, lb.double())
    with pytest.raises(RuntimeError, match="lse_a must have the shape of out_a without its last dim"):
        ma(oa, la[:1], ob, lb)
    with pytest.raises(RuntimeError, match="out_a must be float32, float16 or bfloat16"):
        ma(oa.long(), la, ob.long(), lb)
