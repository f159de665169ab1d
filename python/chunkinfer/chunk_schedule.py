"""The chunk schedule of one prompt call: its memory layer by layer, and the largest chunks that fit.

The layer loop (layer_loop.run_layers) runs layer after layer; a layer's K, V buffers are reserved
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
