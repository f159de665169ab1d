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
        if self.mb.adapter.rope_half_tables:  # each half of the rotated dims by the same angles (gpt-oss)
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        res = (cos, sin)
        if self.single_block:
            self.memo[memo_key] = res
        return res


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated on its first R dims in pairs (2i, 2i + 1), as GLM's apply_rotary_pos_emb
    does it (in x's dtype): cos, sin [B or 1, T, R] as Rope.get gives them (sin's first half negated)."""
    r = cos.shape[-1]
    c = cos[..., : r // 2].repeat_interleave(2, dim=-1).unsqueeze(2)
    s = (-sin[..., : r // 2]).repeat_interleave(2, dim=-1).unsqueeze(2)
    xr = x[..., :r]
    turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([xr * c + turned * s, x[..., r:]], dim=-1)


def write_interleaved(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv, index: torch.Tensor) -> None:
    """rotary_kv_write for pairwise-interleaved rotary (the op rotates halves): q rotated in place, the
    rotated k and v written at cache slots ``index`` (a device tensor, so a CUDA graph replays it)."""
    if q is not None:
        q.copy_(_rotate_interleaved(q, cos, sin))
    kv.k_buf.index_copy_(2, index, _rotate_interleaved(k, cos, sin).transpose(1, 2).to(kv.k_buf.dtype))
    kv.v_buf.index_copy_(2, index, v.transpose(1, 2).to(kv.v_buf.dtype))
