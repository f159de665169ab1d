"""Host-resident K, V kept by the lossless codec (ops.kv_encode; the format: csrc/kv_codec_format.h).

With ``convert(model, kv_offload=True, kv_compression="lossless")`` each host layer's K and V live in
pinned memory as codec blocks: block b of a stream (batch, kv head) holds positions
[b * block_rows, (b + 1) * block_rows) in a slot of fixed size, so a position range is a block range.
Each (layer, K or V) has its own code table, calibrated on the first rows the layer stores.

  store    the layer loop computes a streamed layer's K, V raw in the device staging slot, as without
           compression; positions [p0, p1) are encoded there from the start of p0's block (the slot
           holds that block's earlier rows too), a piece at a time into a scratch on the slot's device,
           and the blocks and the spill units used go to the host. The encoder numbers a piece's spill
           units from 0: they are appended to the layer's pool and the blocks' indices rebased.
  expand   the prefix a call needs crosses to the slot's device compressed and is decoded there
           (ops.kv_decode), bit for bit.
  encoded  a step's CPU share reads the blocks where they are (ops.decode_attention_kv_codec).

No block is ever lost: a piece's scratch has a spill unit per block (the worst case), and the pool
grows. Every copy runs on the transfer engine in order with the current stream, and the host waits for
each piece's spill count: correct everywhere, not yet overlapped with compute on the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .device_layer import ALIGN
from ..ops.kv_codec import KVCodecCalibration, KVCodecLayout, KVCodecStats, codec_stats, kv_calibrate

PIECE_POSITIONS = 16384  # positions encoded or expanded at a time: bounds the device scratch


@dataclass(frozen=True)
class KVCompression:
    """convert(kv_compression=...)'s settings.

    ``block_rows``: positions per codec block (a divisor of the cache's 256-position alignment, so the
    CPU's share of a step, a multiple of 256, starts on a block). ``calibration_rows``: rows of a layer's
    first store its tables are chosen on. ``margin``: the planner sizes host KV at the ratio measured on
    the prompt's first layer divided by (1 + margin). ``escape_capacity``: escapes a block holds before
    it spills; None chooses it on the calibration sample. ``device_layers``: where placement is not
    planned (a model on the CPU), how many layers after the resident ones keep their K, V encoded in the
    device's memory rather than the host's; on CUDA the planner chooses (encoded layers fill the device
    when the host cannot hold the rest)."""

    block_rows: int = 16
    calibration_rows: int = 256
    margin: float = 0.1
    escape_capacity: int | None = None
    device_layers: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.block_rows and ALIGN % self.block_rows == 0):
            raise ValueError(f"block_rows must divide the cache's {ALIGN}-position alignment, got {self.block_rows}")
        if self.device_layers < 0:
            raise ValueError(f"device_layers must be >= 0, got {self.device_layers}")
        if self.calibration_rows < 1 or self.margin < 0:
            raise ValueError(f"calibration_rows must be >= 1 and margin >= 0, got {self.calibration_rows}, "
                             f"{self.margin}")

    def calibrate(self, sample: torch.Tensor) -> KVCodecCalibration:
        """The code table (and escape capacity) of a K or V sample [..., S, D] with these settings."""
        return kv_calibrate(sample, block_rows=self.block_rows, escape_capacity=self.escape_capacity)

    def planned_ratio(self, measured: float) -> float:
        """The ratio the planner sizes encoded KV by: below 1 too, where the data codes badly."""
        return measured / (1.0 + self.margin)


def parse_kv_compression(value) -> KVCompression | None:
    """convert()'s ``kv_compression``: None / False (off), "lossless", or a KVCompression."""
    if value is None or value is False:
        return None
    if isinstance(value, KVCompression):
        return value
    if isinstance(value, str) and value == "lossless":
        return KVCompression()
    raise ValueError(f"kv_compression must be None, 'lossless' or a KVCompression, got {value!r}")


def measured_ratio(k_sample: torch.Tensor, v_sample: torch.Tensor, settings: KVCompression) -> float:
    """The ratio raw / stored of K and V samples [B, Hkv, S, D] together, each with its own table."""
    k, v = settings.calibrate(k_sample), settings.calibrate(v_sample)
    return 2.0 / (1.0 / k.ratio + 1.0 / v.ratio)


class EncodedKV:
    """One of a streamed layer's K or V as codec blocks [B, Hkv, blocks, slot_bytes] and a pool of spill
    units, in host memory (the arena: pinned where the model is on CUDA) or, ``device`` given, in the
    device's memory (a layer kept on the device encoded, expanded there into the staging slot)."""

    def __init__(self, host, calibration: KVCodecCalibration, dtype: torch.dtype, head_dim: int,
                 sample_rows: int, device: torch.device | None = None) -> None:
        self.host = host
        self.device = device               # None: host memory
        self.calibration = calibration
        self.layout: KVCodecLayout = calibration.layout(dtype, head_dim)
        self.table_host = calibration.table.cpu()
        self.table_device = calibration.table     # on the sample's device: no copy per call there
        self.sample_rows = sample_rows     # rows the table was chosen on
        self.blocks: torch.Tensor | None = None
        self.pool = self._allocate_pool(1)
        self.pool_used = 0
        self._last_store: tuple[int, int] | None = None  # (first block, pool units before) of the last store

    def emptied(self) -> "EncodedKV":
        """A new EncodedKV with this one's tables and place, holding nothing yet."""
        return EncodedKV(self.host, self.calibration, self.layout.dtype, self.layout.head_dim, self.sample_rows,
                         self.device)

    # ---- memory ----
    def _allocate(self, shape: list[int]) -> torch.Tensor:
        if self.device is None:
            return self.host.arena.allocate(shape, torch.uint8)
        return torch.empty(shape, dtype=torch.uint8, device=self.device)

    def _allocate_pool(self, units: int) -> torch.Tensor:
        return self._allocate([units, self.layout.spill_unit_bytes])

    @property
    def on_host(self) -> bool:
        return self.device is None

    @property
    def capacity(self) -> int:
        """Positions the blocks have room for."""
        return 0 if self.blocks is None else self.blocks.shape[2] * self.layout.block_rows

    def region_bytes(self, batch: int, n_kv: int, positions: int) -> int:
        return batch * n_kv * self.layout.num_blocks(positions) * self.layout.slot_bytes

    def reserve(self, batch: int, n_kv: int, positions: int, keep: int) -> None:
        """Blocks for ``positions`` positions, keeping the blocks of the first ``keep`` positions."""
        if self.capacity >= positions:
            return
        new = self._allocate([batch, n_kv, self.layout.num_blocks(positions), self.layout.slot_bytes])
        kept = self.layout.num_blocks(keep)
        if kept:
            new[:, :, :kept].copy_(self.blocks[:, :, :kept])
        self.blocks = new

    def nbytes(self) -> int:
        """Bytes held (host or device): the blocks' region and the spill pool's capacity."""
        blocks = 0 if self.blocks is None else self.blocks.numel()
        return blocks + self.pool.numel()

    def _spill_room(self, units: int) -> None:
        if self.pool_used + units <= self.pool.shape[0]:
            return
        grown = self._allocate_pool(max(self.pool_used + units, 2 * self.pool.shape[0]))
        grown[: self.pool_used].copy_(self.pool[: self.pool_used])
        self.pool = grown

    # ---- writes ----
    def table_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.table_host
        return self.table_device if self.table_device.device == device else self.table_host.to(device)

    def store(self, x: torch.Tensor, p0: int, p1: int) -> None:
        """Encode positions [p0, p1) of x [B, Hkv, >= p1, D] (on any device; its rows from p0's block
        start on valid) into the blocks, whose room must be reserved."""
        br = self.layout.block_rows
        b0 = p0 // br
        if self._last_store is not None and b0 <= self._last_store[0]:
            # every block the last store wrote is written again: its spill units are dead
            self.pool_used = self._last_store[1]
        self._last_store = (b0, self.pool_used)
        table = self.table_on(x.device)
        engine = self.host.engine
        for q0 in range(b0 * br, p1, PIECE_POSITIONS):
            q1 = min(q0 + PIECE_POSITIONS, p1)
            enc = ops.kv_encode(x[:, :, q0:q1], table, block_rows=br, escape_capacity=self.layout.escape_capacity)
            first = q0 // br
            used = int(enc.spill_used.item())  # the piece's spill count: the host waits for the encode
            self._spill_room(used)  # before any block is written: growing the pool may fail
            if self.on_host:
                engine.synchronize(engine.offload(enc.blocks, self.blocks, 0, enc.blocks.shape[2], first))
            else:
                self.blocks[:, :, first: first + enc.blocks.shape[2]].copy_(enc.blocks)
            if used:
                self._adopt_spill(enc.spill[:used], first, first + enc.blocks.shape[2])

    def _adopt_spill(self, units: torch.Tensor, first: int, last: int) -> None:
        """Append a piece's spill units to the pool (room made) and point its blocks [first, last) at them."""
        base = self.pool_used
        self.pool[base: base + units.shape[0]].copy_(units)
        self.pool_used += units.shape[0]
        header = self.blocks[:, :, first:last, :8].view(torch.int32)  # (escapes, spill index) per block
        spilled = header[..., 0] > self.layout.escape_capacity
        header[..., 1] += spilled.to(torch.int32) * base

    # ---- reads ----
    def spill_on(self, device: torch.device) -> torch.Tensor:
        """The pool's used units on ``device``: a host pool crosses to a GPU on the transfer engine, which
        holds it until the copy is done and orders the current stream after it (no host wait)."""
        used = max(self.pool_used, 1)  # the op takes a pool of at least one unit
        if self.pool.device == device or device.type != "cuda":
            return self.pool[:used].to(device)
        out = torch.empty(used, self.layout.spill_unit_bytes, dtype=torch.uint8, device=device)
        engine = self.host.engine
        engine.wait(engine.prefetch(self.pool[None, None], out[None, None], 0, used, 0))
        return out

    def expand(self, dst: torch.Tensor, lo: int, n: int) -> None:
        """Decode positions [lo, n) into dst [B, Hkv, >= n, D] (lo a multiple of block_rows), on dst's
        device: the blocks cross to it compressed."""
        br = self.layout.block_rows
        if n <= lo:
            return
        if lo % br:
            raise ValueError(f"expand: the first position {lo} is not a multiple of the block rows {br}")
        device = dst.device
        table, spill = self.table_on(device), self.spill_on(device)
        engine = self.host.engine
        b, h = self.blocks.shape[:2]
        for q0 in range(lo, n, PIECE_POSITIONS):
            q1 = min(q0 + PIECE_POSITIONS, n)
            nb = self.layout.num_blocks(q1 - q0)
            if self.blocks.device == device:  # the device's own, or the CPU model's host blocks
                blocks = self.blocks[:, :, q0 // br: q0 // br + nb]
            else:
                blocks = torch.empty(b, h, nb, self.layout.slot_bytes, dtype=torch.uint8, device=device)
                engine.wait(engine.prefetch(self.blocks, blocks, q0 // br, q0 // br + nb, 0))
            ops.kv_decode(blocks, spill, table, self.layout, q1 - q0, out=dst[:, :, q0:q1])

    def encoded(self, rows: int) -> ops.KVEncoded:
        """The first ``rows`` positions as the CPU attention reads them (host blocks, where they are)."""
        used = torch.tensor([self.pool_used], dtype=torch.int32)
        return ops.KVEncoded(self.blocks, self.spill_on(torch.device("cpu")), used, self.table_host, self.layout, rows)

    def decoded(self, rows: int, first: int = 0) -> torch.Tensor:
        """Positions [first, rows) [B, Hkv, rows - first, D], decoded where the blocks are (inspection,
        tests, the float32 verification)."""
        br = self.layout.block_rows
        b0 = first // br
        blocks = self.blocks[:, :, b0: self.layout.num_blocks(rows)]
        out = ops.kv_decode(blocks, self.spill_on(blocks.device), self.table_on(blocks.device), self.layout,
                            rows - b0 * br)
        return out[:, :, first - b0 * br:]

    def stats(self, rows: int) -> KVCodecStats:
        """What the first ``rows`` positions cost (headers read on the host)."""
        return codec_stats(self.blocks[:, :, : self.layout.num_blocks(rows)], self.layout, rows)


def calibrated(host, x: torch.Tensor, rows: int, settings: KVCompression,
               device: torch.device | None = None) -> EncodedKV:
    """An EncodedKV (in host memory, or on ``device``) whose table is chosen on the first ``rows`` rows
    of x [B, Hkv, >= rows, D] (at most ``settings.calibration_rows``)."""
    n = max(1, min(rows, settings.calibration_rows))
    return EncodedKV(host, settings.calibrate(x[:, :, :n]), x.dtype, x.shape[-1], n, device)


@dataclass(frozen=True)
class LayerCodecReport:
    """What one host layer's K and V cost: raw bytes over stored bytes (slots + spill units referenced),
    and the pool as held (units dead after re-encodes included)."""

    layer: int
    k: KVCodecStats
    v: KVCodecStats
    pool_bytes: int

    @property
    def ratio(self) -> float:
        raw = self.k.raw_bytes + self.v.raw_bytes
        stored = self.k.stored_bytes + self.v.stored_bytes
        return raw / stored if stored else math.nan
