"""Final norm, LM head and soft-capping over rows of the residual stream, one chunk at a time."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import ops
from ..models.adapters import ModelBinding


_HEAD_ELEMENTS = 1 << 27  # max logits elements per LM-head chunk, so [S, vocab] is never allocated


def head_chunk_rows(chunk_size: int, vocab_size: int) -> int:
    """Rows of the residual stream per LM-head chunk: the loop's chunk, capped by the logits' size."""
    return max(16, min(chunk_size, _HEAD_ELEMENTS // max(1, vocab_size)))


def final_norm(mb: ModelBinding, x: torch.Tensor) -> torch.Tensor:
    """The final norm of rows x, computed on the LM head's device: on a model spread over devices, the
    rows move there once (the norm's weight, one vector, comes along if it lives elsewhere)."""
    x = x.to(mb.devices.head)
    with mb.devices.onloaded("final_norm"):
        weight = mb.final_norm.weight.to(x.device)
        return ops.rms_norm(x, weight, mb.norm_eps, gemma=mb.adapter.gemma_norms)


def softcap(mb: ModelBinding, logits: torch.Tensor) -> torch.Tensor:
    """The final logit soft-capping of the models that have one (Gemma)."""
    if mb.final_softcap is None:
        return logits
    return torch.tanh(logits / mb.final_softcap) * mb.final_softcap


def logits_of(mb: ModelBinding, normed: torch.Tensor) -> torch.Tensor:
    return softcap(mb, mb.lm_head(normed))


def iter_logits(mb: ModelBinding, hidden: torch.Tensor, r0: int, r1: int, chunk: int,
                normed: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(a, b, logits of rows [a, b)) for consecutive chunks covering [r0, r1). ``normed``: hidden
    already went through the final norm."""
    for a in range(r0, r1, chunk):
        b = min(a + chunk, r1)
        x = hidden[:, a:b]
        yield a, b, logits_of(mb, x if normed else final_norm(mb, x))
