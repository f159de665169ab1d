"""An assistant model that replays a known continuation: speculative decoding's ceiling (every draft
accepted when the continuation is the target model's own greedy output), for benchmarks and tests.

``generate(..., assistant_model=ReplayAssistant.of(model, prompt, continuation, drafts=8))``: each time
transformers asks the assistant for drafts it returns the next ``drafts`` tokens of ``continuation``
after what has been generated so far, with one-hot scores, and no cache of its own.
"""
from __future__ import annotations

import copy

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput


class ReplayAssistant(torch.nn.Module):
    """Drafts from a fixed continuation; looks enough like a transformers model for assisted generation."""

    def __init__(self, model, prompt_length: int, continuation: torch.Tensor, drafts: int):
        super().__init__()
        self.config = model.config
        self.generation_config = copy.deepcopy(model.generation_config)
        self.generation_config.num_assistant_tokens = drafts
        self.generation_config.num_assistant_tokens_schedule = "constant"
        self.generation_config.assistant_confidence_threshold = 0.0
        self.prompt_length = prompt_length
        self.continuation = continuation.reshape(-1)
        self.vocab = model.config.vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=continuation.device), requires_grad=False)

    @classmethod
    def of(cls, model, prompt: torch.Tensor, continuation: torch.Tensor, drafts: int = 8) -> "ReplayAssistant":
        """The assistant for ``model`` generating after ``prompt`` [1, P]; ``continuation`` [1, N] or [N]."""
        return cls(model, prompt.shape[-1], continuation.to(prompt.device), drafts)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def _supports_logits_to_keep(self) -> bool:
        return False

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 1, **kwargs) -> GenerateDecoderOnlyOutput:
        done = input_ids.shape[-1] - self.prompt_length
        nxt = self.continuation[done:done + max(int(max_new_tokens), 0)]
        if nxt.numel() == 0:  # past the known continuation: propose the last token again (rejected or not)
            nxt = self.continuation[-1:]
        sequences = torch.cat([input_ids, nxt[None].to(input_ids.device)], dim=-1)
        scores = tuple(torch.nn.functional.one_hot(t.reshape(1), self.vocab).float().to(input_ids.device) * 100.0
                       for t in nxt)
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, past_key_values=None)
