"""The chunk schedule of one prompt call: its memory layer by layer, and the largest chunks that fit.

The layer loop (loop/prefill.py: run_layers) runs layer after layer; a layer's K, V buffers are reserved
when the loop reaches it. So the KV alive grows during the call: layer l runs with layers [0, l] at
their capacity after the call and layers (l, L) still at their capacity before it (nothing, on a
fresh cache). A continuation that outgrows a buffer holds old and new buffers of that layer at once
while it copies. The chunk's work buffers come on top. A schedule gives each layer its own chunk,
non-increasing, so that early layers (less KV alive) run larger chunks and the peak stays flat under
the budget as the KV grows (IMDC's decremental chunk, exact here: chunking never changes what a row
computes). Host-resident (offloaded) layers hold no device KV; their staging is counted in ``fixed``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

CHUNK_FLOOR = 1024
CHUNK_CAP = 8192  # 16384 was measured 3% faster at 131k and equal at 262k, but the allocator then
#                   reserved 30.0 GiB for 18.6 GiB allocated at 131k (8192: 18.3 for 17.7): bench/results/bench_h200.md
_OFFLOAD_CHUNK_CAP = 8192   # with host offload the chunk is not grown past the measured default


@dataclass(frozen=True)
class ChunkLimits:
    """The chunk sizes a plan chooses from: powers of two in [floor, cap] (offload_cap with host KV).
    ``cap`` is also the chunk convert() uses when none is planned or given."""

    floor: int
    cap: int
    offload_cap: int


# CUDA: below the floor GEMM efficiency falls; the cap keeps clear of int32 / very-large-M limits.
# CPU: the cap is convert()'s long-standing CPU default (a larger chunk costs memory; no CPU
# measurement shows it faster); the floor 256: below it fp32 GEMMs ran far slower (2-core EPYC,
# [M, 576] x [576, 1536]: 3.6 GFLOP/s at M=64, 22 at 256, 30 at 1024, a shared, noisy machine).
CHUNK_LIMITS = {"cuda": ChunkLimits(CHUNK_FLOOR, CHUNK_CAP, _OFFLOAD_CHUNK_CAP),
                "cpu": ChunkLimits(256, 1024, 1024)}


def chunk_limits(device: torch.device) -> ChunkLimits:
    """The limits of a device type; devices the planner does not model take the CPU's."""
    return CHUNK_LIMITS.get(device.type, CHUNK_LIMITS["cpu"])


def default_chunk_size(device: torch.device) -> int:
    """The chunk a call runs with when none is planned or given."""
    return chunk_limits(device).cap


def chunk_candidates(seq_len: int, cap: int = CHUNK_CAP, floor: int = CHUNK_FLOOR) -> list[int]:
    """Powers of two in [floor, cap], at most seq_len rounded up to a power of two; largest first."""
    top = max(floor, 1 << max(0, (seq_len - 1).bit_length()))
    out, c = [], floor
    while c <= min(cap, top):
        out.append(c)
        c *= 2
    return out[::-1]


@dataclass(frozen=True)
class ChunkWork:
    """Work-buffer bytes of one chunk: the MLP activation buffer kept for the layer, the temporaries
    of a whole block (attention + MLP), and those of a K, V-only pass (the last layer's early rows)."""

    activation: int
    block: int
    kv_only: int


@dataclass
class CallMemory:
    """Device bytes of one call beyond the weights, per layer and chunk size."""

    kv_old: list[int]                     # per layer: KV bytes on the device before the call
    kv_new: list[int]                     # per layer: KV bytes on the device after the call
    fixed: int                            # alive throughout: residual stream, staging, decode growth
    work: Callable[[int], ChunkWork]      # chunk size -> its work buffers
    last_layer_block: bool = False        # the last layer computes every row (no logits_to_keep shortcut)
    tail: int = 0                         # after the last layer: the LM head's logits (every KV alive)

    def __post_init__(self) -> None:
        self._new_upto = [0, *accumulate(self.kv_new)]          # sum(kv_new[:l])
        self._old_from = [*accumulate(self.kv_old[::-1])][::-1] + [0]  # sum(kv_old[l:])

    @property
    def layers(self) -> int:
        return len(self.kv_new)

    def kv_alive(self, layer: int) -> int:
        """KV bytes alive while ``layer`` computes (its own buffer already at the new size)."""
        return self._new_upto[layer + 1] + self._old_from[layer + 1]

    def at(self, layer: int, chunk: int) -> int:
        """Peak bytes while ``layer`` runs with ``chunk``."""
        w = self.work(chunk)
        full = layer < self.layers - 1 or self.last_layer_block
        live = self.kv_alive(layer)
        steady = live + w.activation + (w.block if full else w.kv_only)
        old = self.kv_old[layer]
        # growing a buffer holds old and new until the copy is done (no chunk temporaries then)
        moving = live + old + w.activation if old and old != self.kv_new[layer] else 0
        head = live + self.tail if layer == self.layers - 1 else 0
        return self.fixed + max(steady, moving, head)

    def peak(self, chunks: list[int]) -> tuple[int, int]:
        """(peak bytes, the layer where it occurs) of a per-layer schedule."""
        return max((self.at(li, c), li) for li, c in enumerate(chunks))


def choose(mem: CallMemory, candidates: list[int], fits: Callable[[int], bool]) -> list[int] | None:
    """Per layer the largest candidate (largest first) that ``fits`` the layer's peak bytes, never
    larger than the previous layer's; None when some layer fits none."""
    out: list[int] = []
    for li in range(mem.layers):
        allowed = [c for c in candidates if not out or c <= out[-1]]
        c = next((c for c in allowed if fits(mem.at(li, c))), None)
        if c is None:
            return None
        out.append(c)
    return out


def describe(chunks: list[int]) -> str:
    """'8192' for a uniform schedule, '16384 x 10, 8192 x 22 (layers 0-9, 10-31)' otherwise."""
    runs: list[list[int]] = []
    for li, c in enumerate(chunks):
        if runs and runs[-1][0] == c:
            runs[-1][2] = li
        else:
            runs.append([c, li, li])
    if len(runs) == 1:
        return str(chunks[0])
    sizes = ", ".join(f"{c} x {hi - lo + 1}" for c, lo, hi in runs)
    spans = ", ".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for _, lo, hi in runs)
    return f"{sizes} (layers {spans})"
