"""The lossless KV codec's format in Python: the block layout (the same arithmetic as
csrc/kv_codec_format.h, which documents the bytes), how a 16-bit float splits into the coded exponent
and the stored rest, the size/ratio report of encoded data, and the calibration of the code table.

Plain PyTorch on any device; the kernels are ``chunkinfer.ops.kv_encode`` / ``kv_decode``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TABLE_SIZE = 16       # table entries: the exponents of codes 0..14; entry 15 is ignored
ESCAPE = 15           # the code of an exponent that is not in the table
HEADER_BYTES = 16
PAD_ELEMS = 128       # a block's element count is padded to this in every plane
ESCAPE_ALIGN = 4      # escape capacity granularity (4 entries = 16 bytes)
MAX_BLOCK_ELEMS = 1 << 24
NOT_SPILLED = 0xFFFFFFFF
SPILL_LOST = 0xFFFFFFFE
DEFAULT_BLOCK_ROWS = 16
DEFAULT_ESCAPE_CAPACITY = 16
DTYPES = (torch.bfloat16, torch.float16)

# per dtype: (mantissa bits, exponent mask, extra bit planes, canonical NaN bits)
_BITS = {torch.bfloat16: (7, 0xFF, 0, 0x7FC0), torch.float16: (10, 0x1F, 3, 0x7E00)}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class KVCodecLayout:
    """Where everything sits in one block's slot (see csrc/kv_codec_format.h for the bytes).

    A block is ``block_rows`` consecutive rows (positions) of one stream (e.g. one (batch, kv head)),
    N = block_rows * head_dim elements; every block has a slot of ``slot_bytes``, so block b of a
    stream starts at byte b * slot_bytes of that stream's blocks."""

    dtype: torch.dtype
    head_dim: int
    block_rows: int = DEFAULT_BLOCK_ROWS
    escape_capacity: int = DEFAULT_ESCAPE_CAPACITY

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"kv codec: dtype must be bfloat16 or float16, got {self.dtype}")
        if self.head_dim < 1 or self.block_rows < 1:
            raise ValueError(f"kv codec: head_dim and block_rows must be >= 1, got {self.head_dim}, {self.block_rows}")
        if self.block_elems > MAX_BLOCK_ELEMS:
            raise ValueError(f"kv codec: a block of {self.block_elems} elements exceeds {MAX_BLOCK_ELEMS}")
        e = self.escape_capacity
        if e < 0 or e % ESCAPE_ALIGN or e > self.block_elems:
            raise ValueError(f"kv codec: escape_capacity must be a multiple of {ESCAPE_ALIGN} in "
                             f"[0, {self.block_elems}], got {e}")

    @property
    def block_elems(self) -> int:
        return self.block_rows * self.head_dim

    @property
    def padded_elems(self) -> int:
        return _round_up(self.block_elems, PAD_ELEMS)

    @property
    def extra_planes(self) -> int:
        return _BITS[self.dtype][2]

    @property
    def rest_offset(self) -> int:
        return HEADER_BYTES

    @property
    def codes_offset(self) -> int:
        return self.rest_offset + self.padded_elems

    @property
    def extra_offset(self) -> int:
        return self.codes_offset + self.padded_elems // 2

    @property
    def extra_plane_bytes(self) -> int:
        return self.padded_elems // 8

    @property
    def escape_offset(self) -> int:
        return self.extra_offset + self.extra_planes * self.extra_plane_bytes

    @property
    def slot_bytes(self) -> int:
        return self.escape_offset + 4 * self.escape_capacity

    @property
    def spill_unit_bytes(self) -> int:
        """One spilled block's exponent plane in the spill pool."""
        return self.padded_elems

    def num_blocks(self, rows: int) -> int:
        return -(-rows // self.block_rows)

    @property
    def raw_block_bytes(self) -> int:
        return 2 * self.block_elems

    @property
    def worst_case_block_bytes(self) -> int:
        """A block whose escapes overflow: its slot plus its spilled exponent plane."""
        return self.slot_bytes + self.spill_unit_bytes


def split_bits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exponent, rest byte, extra bits) of every element of a bf16/fp16 tensor, as int32 tensors."""
    mant, emask, planes, _ = _BITS[x.dtype]
    w = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    e = (w >> mant) & emask
    if planes == 0:  # bf16: rest = sign << 7 | mantissa
        return e, ((w >> 8) & 0x80) | (w & 0x7F), torch.zeros_like(w)
    return e, w & 0xFF, ((w >> 13) & 4) | ((w >> 8) & 3)  # fp16: low mantissa byte; sign, mantissa 9..8


def join_bits(e: torch.Tensor, rest: torch.Tensor, extra: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit words (int32 in [0, 65536)) that split_bits took apart."""
    if _BITS[dtype][2] == 0:
        return ((rest & 0x80) << 8) | ((e & 0xFF) << 7) | (rest & 0x7F)
    return ((extra & 4) << 13) | ((e & 0x1F) << 10) | ((extra & 3) << 8) | (rest & 0xFF)


def words_to(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 words in [0, 65536) reinterpreted as dtype."""
    return ((w ^ 0x8000) - 0x8000).to(torch.int16).view(dtype)


def nan_bits(dtype: torch.dtype) -> int:
    return _BITS[dtype][3]


def code_of_exponent(table: torch.Tensor) -> torch.Tensor:
    """[256] int64: the code of each exponent value (the first table entry equal to it, else ESCAPE)."""
    lut = torch.full((256,), ESCAPE, dtype=torch.int64, device=table.device)
    entries = table[: TABLE_SIZE - 1].to(torch.int64)
    for c in reversed(range(TABLE_SIZE - 1)):
        lut[entries[c]] = c
    return lut


def block_view(x: torch.Tensor, layout: KVCodecLayout, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., S, D] as blocks: (values [G, Np] (padding = fill), valid [G, Np] bool), G = streams * nb."""
    rows = x.shape[-2]
    flat = x.reshape(-1, rows * x.shape[-1])
    nb, n, np_ = layout.num_blocks(rows), layout.block_elems, layout.padded_elems
    padded = flat.new_full((flat.shape[0], nb * n), fill)
    padded[:, : flat.shape[1]] = flat
    valid = torch.zeros(flat.shape[0], nb * n, dtype=torch.bool, device=x.device)
    valid[:, : flat.shape[1]] = True
    values = padded.new_full((flat.shape[0] * nb, np_), fill)
    values[:, :n] = padded.view(-1, n)
    mask = torch.zeros(flat.shape[0] * nb, np_, dtype=torch.bool, device=x.device)
    mask[:, :n] = valid.view(-1, n)
    return values, mask


def block_headers(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(escapes, spill field) of every block of blocks [..., nb, slot_bytes], as int64 [..., nb]."""
    head = blocks[..., :8].to(torch.int64)
    words = head[..., 0::4] | head[..., 1::4] << 8 | head[..., 2::4] << 16 | head[..., 3::4] << 24
    return words[..., 0], words[..., 1]


@dataclass(frozen=True)
class KVCodecStats:
    """What encoded data costs. stored_bytes: every slot plus the spill units used (the pool's unused
    capacity not counted); ratio = raw_bytes / stored_bytes."""

    blocks: int
    escapes: int
    spilled_blocks: int
    lost_blocks: int       # spilled with the pool full: they decode to NaN; re-encode with a bigger pool
    raw_bytes: int
    slot_bytes: int
    spill_bytes: int

    @property
    def stored_bytes(self) -> int:
        return self.slot_bytes + self.spill_bytes

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("nan")


def codec_stats(blocks: torch.Tensor, layout: KVCodecLayout, rows: int) -> KVCodecStats:
    """The size report of blocks [..., nb, slot_bytes] holding [..., rows, head_dim] (reads the headers)."""
    escapes, spill = block_headers(blocks)
    spilled = escapes > layout.escape_capacity
    lost = spilled & (spill == SPILL_LOST)
    n_spilled = int(spilled.sum())
    streams = math.prod(blocks.shape[:-2])
    n_lost = int(lost.sum())
    return KVCodecStats(blocks=int(escapes.numel()), escapes=int(escapes.sum()), spilled_blocks=n_spilled,
                        lost_blocks=n_lost, raw_bytes=streams * rows * layout.head_dim * 2, slot_bytes=blocks.numel(),
                        spill_bytes=(n_spilled - n_lost) * layout.spill_unit_bytes)


@dataclass(frozen=True)
class KVCodecCalibration:
    """A table and escape capacity chosen on a sample, and what they give on it."""

    table: torch.Tensor          # [16] uint8 on the sample's device
    block_rows: int
    escape_capacity: int
    escape_rate: float           # escaped elements / elements of the sample
    spill_fraction: float        # blocks of the sample with more escapes than the capacity
    ratio: float                 # raw bytes / (slots + spill units) of the sample
    exponent_entropy: float      # bits per element
    entropy_bound_ratio: float   # the ratio if the exponent were coded at its entropy (no block costs)

    def layout(self, dtype: torch.dtype, head_dim: int) -> KVCodecLayout:
        return KVCodecLayout(dtype, head_dim, self.block_rows, self.escape_capacity)


def exponent_table(exponents: torch.Tensor) -> torch.Tensor:
    """[16] uint8: the 15 most frequent exponents (ties: the smaller first), padded by repeating the
    first (an unused duplicate), entry 15 = 0."""
    counts = torch.bincount(exponents.flatten(), minlength=256)[:256].cpu()
    order = sorted(range(256), key=lambda e: (-int(counts[e]), e))
    present = [e for e in order[: TABLE_SIZE - 1] if counts[e] > 0] or [0]
    present += [present[0]] * (TABLE_SIZE - 1 - len(present))
    return torch.tensor(present + [0], dtype=torch.uint8, device=exponents.device)


def kv_calibrate(sample: torch.Tensor, *, block_rows: int = DEFAULT_BLOCK_ROWS, escape_capacity: int | None = None,
                 escape_headroom: int = 4) -> KVCodecCalibration:
    """The code table of a sample [..., S, D] (bf16/fp16, e.g. one layer's K or V of a prompt's first
    chunk): its 15 most frequent exponents. ``escape_capacity`` None chooses the capacity that makes the
    sample smallest (slot bytes against spilled blocks) plus ``escape_headroom`` entries: a 256-position
    sample has only 16 blocks per stream, and later positions escape a little more (on the study's real
    K, V, bench/results/kv_codec_cpu.md, the worst layer went from 1.21x without it to 1.27x with it). The
    result reports the ratio measured on the sample with that capacity.

    Tables differ between layers and between K and V (bench/results/kv_codec_cpu.md: layer 0's table
    applied to the other layers expands some of them), so calibrate each (layer, K/V)."""
    if sample.dtype not in DTYPES or sample.dim() < 2 or sample.numel() == 0:
        raise ValueError(f"kv_calibrate: sample must be a non-empty bf16/fp16 [..., S, D], got "
                         f"{sample.dtype} {tuple(sample.shape)}")
    e, _, _ = split_bits(sample)
    table = exponent_table(e)
    counts = torch.bincount(e.flatten(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    exp_bits = 8 if sample.dtype == torch.bfloat16 else 5
    probe = KVCodecLayout(sample.dtype, sample.shape[-1], block_rows, 0)
    codes = code_of_exponent(table)[e]
    values, valid = block_view(codes, probe)
    per_block = ((values == ESCAPE) & valid).sum(1).cpu()
    n_blocks = per_block.numel()

    def cost(cap: int) -> float:  # bytes of the sample with this capacity
        lay = KVCodecLayout(sample.dtype, sample.shape[-1], block_rows, cap)
        return n_blocks * lay.slot_bytes + int((per_block > cap).sum()) * lay.spill_unit_bytes

    if escape_capacity is None:
        most = probe.block_elems // ESCAPE_ALIGN * ESCAPE_ALIGN
        top = min(_round_up(int(per_block.max()), ESCAPE_ALIGN), most)
        best = min(range(0, top + 1, ESCAPE_ALIGN), key=lambda c: (cost(c), -c))
        escape_capacity = min(_round_up(best + max(escape_headroom, 0), ESCAPE_ALIGN), most)
    lay = KVCodecLayout(sample.dtype, sample.shape[-1], block_rows, escape_capacity)
    return KVCodecCalibration(
        table=table, block_rows=block_rows, escape_capacity=escape_capacity,
        escape_rate=float(per_block.sum()) / sample.numel(),
        spill_fraction=float((per_block > escape_capacity).double().mean()),
        ratio=2 * sample.numel() / cost(escape_capacity), exponent_entropy=entropy,
        entropy_bound_ratio=16 / (16 - exp_bits + entropy))
