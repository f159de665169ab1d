"""Causal-LM cross entropy accumulated chunk by chunk; the same reduction as transformers' ForCausalLMLoss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Position t predicts labels[t + 1]; the last position predicts nothing (ignore_index)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class ChunkedCrossEntropy:
    """Sum of token cross entropies over logit chunks; ``result`` divides like ForCausalLMLoss: by the
    number of counted tokens, or by ``num_items_in_batch`` when given."""

    def __init__(self, targets: torch.Tensor, ignore_index: int = -100):
        self.targets, self.ignore_index = targets, ignore_index
        self.total = torch.zeros((), dtype=torch.float32, device=targets.device)

    def add(self, logits: torch.Tensor, r0: int, r1: int) -> None:
        """logits [B, r1 - r0, V] for rows [r0, r1)."""
        t = self.targets[:, r0:r1].reshape(-1).to(logits.device)
        self.total = self.total.to(logits.device) + F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), t, ignore_index=self.ignore_index, reduction="sum")

    def result(self, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(self.total.device)
            return self.total / num_items_in_batch
        count = (self.targets != self.ignore_index).sum().to(self.total.device)
        return self.total / count
