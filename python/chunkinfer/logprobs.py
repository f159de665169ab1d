"""Exact per-token log-probabilities of a long document, chunked like the forward."""
from __future__ import annotations

import torch

from .kv.cache import ChunkKVCache
from .convert import build_state, is_converted
from .forward import NotOnLoop, check_inputs, mask_layout, plan_prompt_chunks, planned_kv_ratio
from .kv.placement import PromptCall
from .loop.head import head_chunk_rows, iter_logits
from .loop.prefill import LoopInputs, run_layers


@torch.no_grad()
def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   chunk_size: int | None = None) -> torch.Tensor:
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) for t < S - 1, as fp32 [B, S - 1].

    Works on converted and unconverted supported models (the model is not changed). Equal to
    ``log_softmax(model(input_ids).logits.float(), -1)`` gathered at the next tokens, without ever
    holding [S, vocab] logits. A mask may pad rows on the left and on the right; positions then count
    each row's real tokens (as generate() does); values at padding positions are meaningless. Planned as
    a converted model's prompts are (its memory budget, chunk schedule and KV offload), so a document
    that does not fit raises InsufficientMemoryError before any work.
    """
    state = model._chunkinfer if is_converted(model) and chunk_size is None else build_state(model, chunk_size)
    mb = state.binding
    b, s = check_inputs(model, {"input_ids": input_ids, "attention_mask": attention_mask}, 0)
    try:
        key_starts = mask_layout(attention_mask, 0, s).starts
    except NotOnLoop as exc:
        raise ValueError(f"token_logprobs: {exc}") from None
    cache = ChunkKVCache(len(mb.layers), state.host, mb.windows)
    weight = mb.embed.weight
    if attention_mask is None:
        pos = torch.arange(s, device=input_ids.device)[None]
    else:  # generate()'s convention: positions count real tokens
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    call = PromptCall(b, 0, s, weight.dtype, weight.device, last_layer_block=True, logits_rows=0, log_probs=True,
                      kv_compression_ratio=planned_kv_ratio(state, input_ids, None, pos, 0))
    chunk, chunks = plan_prompt_chunks(model, state, cache, call)
    hidden = mb.embed(input_ids)
    pos = pos.to(hidden.device)
    inp = LoopInputs(hidden=hidden, position_ids=pos, start=0, key_starts=key_starts, chunk=chunk, chunks=chunks,
                     progress=state.progress)
    hidden = run_layers(mb, cache, inp)  # on a model spread over devices: the last layer's device
    del cache
    out = torch.empty(b, s - 1, dtype=torch.float32, device=hidden.device)
    head_chunk = head_chunk_rows(chunk, model.config.vocab_size)
    for r0, r1, logits in iter_logits(mb, hidden, 0, s - 1, head_chunk):
        lp = torch.log_softmax(logits.float(), dim=-1)
        out[:, r0:r1] = lp.gather(-1, input_ids[:, r0 + 1:r1 + 1, None].to(lp.device)).squeeze(-1)
    return out
