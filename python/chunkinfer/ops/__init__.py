"""Typed wrappers over torch.ops.chunkinfer: the one Python entry to every op.

The schemas are defined in C++ (csrc/registration.cpp) and loaded by library.py, which falls back to
the plain-PyTorch references (reference.py) under the same names when the compiled extension cannot be
loaded, so model code and torch.compile behave the same everywhere; ``build_info()`` says which happened.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .library import build_info, has_kernel  # noqa: F401  (importing it registers the ops)


def silu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up. x is [..., 2d] (gate | up), or the gate [..., d] when ``up`` is given."""
    if out is None:
        return torch.ops.chunkinfer.silu_and_mul(x, up)
    torch.ops.chunkinfer.silu_and_mul_out(out, x, up)
    return out


def gelu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None, *, approximate: str = "none",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(gate, approximate) * up, laid out as for :func:`silu_and_mul`."""
    if out is None:
        return torch.ops.chunkinfer.gelu_and_mul(x, up, approximate)
    torch.ops.chunkinfer.gelu_and_mul_out(out, x, up, approximate)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension with fp32 statistics; ``gemma`` scales by (1 + weight)."""
    if out is None:
        return torch.ops.chunkinfer.rms_norm(x, weight, eps, gemma)
    torch.ops.chunkinfer.rms_norm_out(out, x, weight, eps, gemma)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       gemma: bool = False) -> None:
    """In place: residual += x, then x = rms_norm(residual) * weight."""
    torch.ops.chunkinfer.fused_add_rms_norm(x, residual, weight, eps, gemma)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     starts: torch.Tensor | None = None, *, scale: float | None = None, window: int = 0,
                     prefix_ready: bool = False, split_keys: int = 0, out: torch.Tensor | None = None,
                     lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new tokens per sequence over a preallocated KV cache; returns (out, lse).

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, capacity, D] (last dim contiguous, any other strides);
    seq_lens, starts [B] int32 on q's device. The new tokens' K, V are already in the cache: query t
    sits at position seq_lens[b] - T + t and sees keys [starts[b], pos] (only the last ``window``
    of them when window > 0), causal among the new tokens; Hq must be a multiple of Hkv. Lengths
    are read on the device, so a CUDA graph captured once serves every later length up to the
    capacity. out [B, Hq, T, D] has q's dtype, lse [B, Hq, T] is fp32 (natural log, -inf where a
    query saw no key, its out then 0). Pass both ``out`` and ``lse`` to write into them. The lengths
    are not checked against the capacity (that would need a device sync): with window 0 a seq_len
    beyond it is read as the capacity; with window > 0 the cache may be a ring: key j at slot
    j % capacity (the caller keeps capacity >= window + T - 1). A start outside [0, seq_len] is
    clamped into it. CUDA: head dim a multiple of 8 up to 256, K, V 16-byte aligned; CPU: any head dim.

    ``split_keys`` > 0 (a multiple of 256): the keys are reduced in pieces [i * split_keys, (i + 1) *
    split_keys) of absolute position, merged in order, so a query's result depends only on its own
    position and keys, never on T, the other queries, the lengths or the capacity: a T-token step
    computes each row bit for bit as a one-token step at that position does (with the same
    split_keys). 0: the key range is cut into as many pieces as fill the device (faster for one-off
    calls, but the pieces move with the length).

    ``prefix_ready`` (CUDA; a promise, not checked): no kernel still running when this one starts
    writes seq_lens, starts or the cached K, V before the new tokens, so the kernel reads them
    before the kernel ahead of it on the stream has finished (it is launched early). A kernel of
    PyTorch's own ends before the next one starts; chunkinfer's may not, so leave it False after
    writing older positions (``rotary_kv_write`` at earlier indices) just before this call.
    """
    if out is None and lse is None:
        return torch.ops.chunkinfer.decode_attention(q, k_cache, v_cache, seq_lens, starts, scale, window,
                                                     prefix_ready, split_keys)
    if out is None or lse is None:
        raise ValueError("decode_attention: pass both out and lse, or neither")
    torch.ops.chunkinfer.decode_attention_out(out, lse, q, k_cache, v_cache, seq_lens, starts, scale, window,
                                              prefix_ready, split_keys)
    return out, lse


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                      out: torch.Tensor | None = None,
                      lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint keys; returns (out, lse).

    out_a, out_b [..., D] of one dtype (e.g. [B, H, T, D]); lse_a, lse_b [...] fp32 natural-log
    log-sum-exps. A segment with lse -inf contributes nothing; both -inf give out 0, lse -inf.
    ``out``/``lse`` may be out_a/lse_a (or out_b/lse_b) to merge in place.
    """
    if out is None and lse is None:
        return torch.ops.chunkinfer.merge_attn_states(out_a, lse_a, out_b, lse_b)
    if out is None or lse is None:
        raise ValueError("merge_attn_states: pass both out and lse, or neither")
    torch.ops.chunkinfer.merge_attn_states_out(out, lse, out_a, lse_a, out_b, lse_b)
    return out, lse


def rotary_kv_write(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor) -> None:
    """Rotary embedding of new tokens and their K, V written into a preallocated cache, in one pass.

    q [B, T, Hq, D] (rotated in place; None to skip), k, v [B, T, Hkv, D], cos, sin [1 or B, T, R]
    with R even and <= D (partial rotary leaves dims R.. as they are) and ``sin``'s first half negated,
    so that x' = x * cos + roll(x, R/2) * sin == x * cos + rotate_half(x) * sin_hf. k_cache, v_cache
    [B, Hkv, capacity, D]: token t's rotated K and its V go to position index[t] (int64 [T] on the
    device, so a CUDA graph replays it at every step; positions outside the capacity are skipped).
    All last dims contiguous, one dtype; fp32 math with one rounding per output.
    """
    torch.ops.chunkinfer.rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, index)


GEMV_MAX_ROWS = 4  # rows of x the CUDA gemv ops take (csrc/ops.h kGemvMaxRows); the CPU ones take any number
GEMV_MAX_X_BYTES = 144 * 1024  # x's rows in shared memory on CUDA (csrc/ops.h kGemvMaxXBytes)


@dataclass(frozen=True)
class NormPrologue:
    """What the gemv ops compute in front of their projections, in the same launch on CUDA: the
    residual r = x (+ add), rounded to x's dtype, written to ``residual_out`` if given (which must not
    share memory with x or add), and the projections are of rms_norm(r) with ``weight`` (Gemma's
    (1 + weight) when ``gemma``), as :func:`fused_add_rms_norm` rounds it. A decode step passes the
    previous sublayer's output as ``add`` and alternates between two residual buffers."""

    weight: torch.Tensor
    eps: float
    gemma: bool = False
    add: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None

    def args(self) -> tuple:
        return self.weight, self.eps, self.gemma, self.add, self.residual_out


_NO_PROLOGUE = (None, 0.0, False, None, None)


def gemv_rows_per_call(device: torch.device, rows: int) -> int:
    """How many of ``rows`` rows one gemv call takes on ``device``: GEMV_MAX_ROWS on CUDA, all on the CPU.
    Either way a row is computed the same whatever the call's other rows (a step's rows equal one-token
    steps' bit for bit)."""
    return min(rows, GEMV_MAX_ROWS) if device.type == "cuda" else rows


def gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, *,
         norm: NormPrologue | None = None) -> torch.Tensor:
    """x [..., K] (contiguous rows; on CUDA 1 to GEMV_MAX_ROWS) projected by each weight [M_i, K] (+ its bias),
    the outputs side by side: [..., sum M_i] (q, k and v of a decode step in one launch on CUDA), of
    rms_norm(x (+ add)) with ``norm``. Each projection is rounded to x's dtype as F.linear rounds it.
    See :func:`gemv_supports`."""
    pro = _NO_PROLOGUE if norm is None else norm.args()
    return torch.ops.chunkinfer.gemv(x, weights, [None] * len(weights) if biases is None else biases, *pro)


def gemv_act_and_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *,
                     approximate: str = "none", norm: NormPrologue | None = None) -> torch.Tensor:
    """act(x gate^T) * (x up^T) for x [..., K] (rows as in :func:`gemv`): the decode step's gate and up
    projections and their activation in one launch on CUDA (of rms_norm(x (+ add)) with ``norm``);
    activation "silu" or "gelu" (``approximate`` "none" or "tanh"). Each projection rounded to x's dtype
    first, as F.linear and silu_and_mul do."""
    pro = _NO_PROLOGUE if norm is None else norm.args()
    return torch.ops.chunkinfer.gemv_act_and_mul(x, gate, up, activation, approximate, *pro)


def gemv_supports(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the gemv ops take x and these weights: contiguous rows of a float dtype (on CUDA 1 to
    GEMV_MAX_ROWS), weights [M, K] contiguous on x's device in its dtype; on CUDA also K a multiple of one
    16-byte vector, x within GEMV_MAX_X_BYTES and every pointer 16-byte aligned. Callers use a matrix
    product otherwise."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not x.is_contiguous() or x.dim() == 0:
        return False
    k = x.shape[-1]
    cuda = x.device.type == "cuda"
    if k == 0 or not 1 <= x.numel() // k <= (GEMV_MAX_ROWS if cuda else x.numel()):
        return False
    if cuda and (k % (16 // x.element_size()) or x.data_ptr() % 16 or x.numel() * x.element_size() > GEMV_MAX_X_BYTES):
        return False
    return all(w.dim() == 2 and w.shape[1] == k and w.dtype == x.dtype and w.device == x.device
               and w.is_contiguous() and not (cuda and w.data_ptr() % 16) for w in weights)


CUDA_DECODE_MAX_HEAD_DIM = 256  # decode_attention's CUDA kernels: head dims that are multiples of 8 up to this


def decode_kernel_supports(head_dim: int, device: torch.device) -> bool:
    """Whether decode_attention runs for this head dim on this device (the CPU kernel takes any)."""
    return device.type != "cuda" or (head_dim % 8 == 0 and 0 < head_dim <= CUDA_DECODE_MAX_HEAD_DIM)




# ---- lossless KV codec ----
from .kv_codec import (  # noqa: E402  (appended section; the format's own module)
    KVCodecCalibration, KVCodecLayout, KVCodecStats, codec_stats, kv_calibrate,
)


@dataclass(frozen=True)
class KVEncoded:
    """K or V rows [..., rows, head_dim] encoded by :func:`kv_encode`: ``blocks`` [..., nb, slot_bytes]
    uint8 (one fixed-size slot per block of ``layout.block_rows`` rows), ``spill`` [capacity,
    spill_unit_bytes] uint8 with its counter ``spill_used`` [1] int32, and the ``table`` they were coded
    with. ``decode()`` gives the rows back bit for bit; ``stats()`` what they cost."""

    blocks: torch.Tensor
    spill: torch.Tensor
    spill_used: torch.Tensor
    table: torch.Tensor
    layout: KVCodecLayout
    rows: int

    def decode(self, *, out: torch.Tensor | None = None) -> torch.Tensor:
        return kv_decode(self.blocks, self.spill, self.table, self.layout, self.rows, out=out)

    def stats(self) -> KVCodecStats:
        """Reads the block headers (a device sync on the GPU)."""
        return codec_stats(self.blocks, self.layout, self.rows)


def kv_encode(x: torch.Tensor, table: torch.Tensor, *, block_rows: int = 16, escape_capacity: int = 16,
              spill_blocks: int = -1) -> KVEncoded:
    """Lossless compression of bf16/fp16 K or V rows x [..., S, D] (a stream per leading index, e.g.
    [B, Hkv, S, D]; each stream's rows contiguous, the streams anywhere).

    Each exponent becomes a 4-bit code from ``table`` ([16] uint8 on x's device: the exponents of codes
    0..14, e.g. ``kv_calibrate(sample).table``; code 15 = escape), sign and mantissa are kept. Blocks of
    ``block_rows`` rows of one stream get fixed-size slots (``KVCodecLayout.slot_bytes``), so block b of a
    stream is at byte b * slot_bytes: a tile of positions [b * block_rows, (b + 1) * block_rows) finds its
    data by arithmetic and decodes it alone. A block keeps up to ``escape_capacity`` escaped exponents in
    its slot as (position << 8 | exponent) u32 entries; with more it spills its whole exponent plane
    (``spill_unit_bytes``) to the next unit of ``spill`` (``spill_blocks`` units; -1 = one per block, the
    worst case, so nothing is ever lost). Bounded size whatever the data: at most slot + spill unit per
    block, 1.25x the raw bytes for bf16 (1.44x for fp16) plus 16 + 4 * escape_capacity bytes per block.
    Block slot layout (offsets from ``KVCodecLayout``): 16-byte header (u32 escapes, u32 spill index), rest bytes (bf16: sign << 7 | mantissa; fp16: low 8
    mantissa bits), 4-bit codes (element i in nibble i & 1 of byte i / 2), fp16 only 3 bit planes (sign,
    mantissa bits 9..8), escape entries.

    On CUDA: x's streams 16-byte aligned for vector loads (any alignment works, slower); blocks and
    spill 16-byte aligned. Spill units are taken in an order that can vary between CUDA runs (one atomic
    per spilled block); the CPU takes them in block order."""
    blocks, spill, used = torch.ops.chunkinfer.kv_encode(x, table, block_rows, escape_capacity, spill_blocks)
    return KVEncoded(blocks, spill, used, table, KVCodecLayout(x.dtype, x.shape[-1], block_rows, escape_capacity),
                     x.shape[-2])


def kv_encode_into(blocks: torch.Tensor, spill: torch.Tensor, spill_used: torch.Tensor, x: torch.Tensor,
                   table: torch.Tensor, *, block_rows: int = 16, escape_capacity: int = 16) -> None:
    """:func:`kv_encode` into preallocated buffers, e.g. a block range of a cache's
    [B, Hkv, capacity_blocks, slot_bytes] for rows [b0 * block_rows, ...) of x. spill_used is read and
    advanced on the device (no sync): units [old, new) of spill were taken; if new > spill.shape[0] the
    blocks past the pool were not stored (their spill field reads SPILL_LOST; they decode to NaN):
    compare spill_used with the capacity before relying on them, and re-encode with a bigger pool."""
    torch.ops.chunkinfer.kv_encode_out(blocks, spill, spill_used, x, table, block_rows, escape_capacity)


def kv_decode(blocks: torch.Tensor, spill: torch.Tensor, table: torch.Tensor, layout: KVCodecLayout, rows: int, *,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The rows [..., rows, head_dim] that blocks [..., ceil(rows / block_rows), slot_bytes] (+ spill)
    hold, bit for bit; into ``out`` (its rows contiguous, its streams anywhere: e.g. a slice
    [B, Hkv, p0:p1, D] of a cache, p0 a multiple of block_rows) when given. Data the blocks do not hold
    (a lost spill) decodes to NaN, never to another number."""
    if out is None:
        return torch.ops.chunkinfer.kv_decode(blocks, spill, table, rows, layout.head_dim, layout.dtype,
                                              layout.block_rows, layout.escape_capacity)
    if out.dtype != layout.dtype or tuple(out.shape[-2:]) != (rows, layout.head_dim):
        raise ValueError(f"kv_decode: out must be [..., {rows}, {layout.head_dim}] {layout.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    torch.ops.chunkinfer.kv_decode_out(out, blocks, spill, table, layout.block_rows, layout.escape_capacity)
    return out


def decode_attention_kv_codec(q: torch.Tensor, k: KVEncoded, v: KVEncoded, seq_lens: torch.Tensor,
                              starts: torch.Tensor | None = None, *, scale: float | None = None,
                              split_keys: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_attention` (window 0) over K and V held compressed (:func:`kv_encode` of
    [B, Hkv, capacity, D] caches, each with its own table and escape capacity, the same block_rows and
    number of blocks): each block of keys is decoded into a
    small buffer where the plain kernel reads the cache, so (out, lse) equal, bit for bit,
    ``decode_attention`` over the decoded K, V with the same split_keys. The CPU only (host KV); q's
    dtype is the layout's."""
    if (k.layout.dtype, k.layout.head_dim, k.layout.block_rows) != (v.layout.dtype, v.layout.head_dim,
                                                                     v.layout.block_rows) \
            or k.blocks.shape[:-1] != v.blocks.shape[:-1]:
        raise ValueError(f"decode_attention_kv_codec: k and v must share dtype, head dim, block_rows and blocks, "
                         f"got {k.layout} {tuple(k.blocks.shape)} and {v.layout} {tuple(v.blocks.shape)}")
    if q.device.type != "cpu":
        raise ValueError(f"decode_attention_kv_codec: runs on the CPU (host KV), got q on {q.device}")
    if q.dtype != k.layout.dtype:
        raise ValueError(f"decode_attention_kv_codec: q is {q.dtype} but the K, V blocks hold {k.layout.dtype}")
    return torch.ops.chunkinfer.decode_attention_kv_codec(q, k.blocks, k.spill, k.table, v.blocks, v.spill, v.table,
                                                          seq_lens, starts, scale, k.layout.block_rows,
                                                          k.layout.escape_capacity, v.layout.escape_capacity,
                                                          split_keys)
