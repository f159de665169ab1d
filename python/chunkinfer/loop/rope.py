"""Rotary cos / sin for a block of rows, from the model's own rotary module (every rope type it has)."""
from __future__ import annotations

import torch

from ..models.adapters import ModelBinding
from ..models.devices import unhooked


class Rope:
    """cos and sign-folded sin per block of rows, for ``ops.rotary_kv_write``.

    rotate_half(x) * sin == roll(x, D/2) * cat(-sin1, sin2) exactly, which saves three ops per call.
    """

    def __init__(self, mb: ModelBinding, position_ids: torch.Tensor, like: torch.Tensor, single_block: bool):
        # positions where the stream is (generate() may build them on the inputs' device, not the layer's)
        self.mb, self.pos, self.x = mb, position_ids.to(like.device), like
        # dynamic / longrope pick frequencies from the call's max position: give every block that max
        self.global_max = self.pos.amax(1, keepdim=True) if mb.rope_needs_global_max else None
        self.single_block = single_block  # one block per layer: memoise per rope key
        self.memo: dict = {}

    def get(self, key: str | None, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B or 1, c1 - c0, rot_dim] of rows [c0, c1) for the layer type ``key``."""
        memo_key = (key, c0, c1)
        if self.single_block and memo_key in self.memo:
            return self.memo[memo_key]
        pos = self.pos[:, c0:c1]
        if self.global_max is not None:
            pos = torch.cat([pos, self.global_max], dim=1)
        rotary = unhooked(self.mb.rotary)  # computed where the layer runs (accelerate's hook would move it)
        cos, sin = rotary(self.x, pos) if key is None else rotary(self.x, pos, key)
        if self.global_max is not None:
            cos, sin = cos[:, :-1], sin[:, :-1]
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        res = (cos, sin)
        if self.single_block:
            self.memo[memo_key] = res
        return res
