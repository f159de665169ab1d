"""convert() validates before changing anything; bad input raises before any work."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import chunkinfer
from tests.tiny_models import left_padded_batch, make_model


def test_unsupported_model_names_supported_and_is_untouched():
    cfg = T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = T.GPT2LMHeadModel(cfg)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        chunkinfer.convert(model)
    assert "forward" not in vars(model) and not chunkinfer.is_converted(model)


@pytest.mark.parametrize("bad, exc", [("8", TypeError), (2.0, TypeError), (True, TypeError), (0, ValueError),
                                      (-4, ValueError)])
def test_bad_chunk_size_rejected_before_change(bad, exc):
    model = make_model("llama")
    with pytest.raises(exc, match="chunk_size"):
        chunkinfer.convert(model, chunk_size=bad)
    assert not chunkinfer.is_converted(model)


def test_revert_restores_stock_forward():
    model = make_model("llama")
    ids, _ = left_padded_batch(1, 20, [0])
    with torch.no_grad():
        ref = model(ids).logits
        chunkinfer.convert(model, chunk_size=8)
        assert chunkinfer.is_converted(model)
        chunkinfer.revert(model)
        assert not chunkinfer.is_converted(model) and "forward" not in vars(model)
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(ValueError):
        chunkinfer.revert(model)


@torch.no_grad()
def test_bad_inputs_raise_and_leave_cache_unchanged():
    model = chunkinfer.convert(make_model("llama"), chunk_size=8)
    ids, _ = left_padded_batch(1, 20, [0])
    cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match="exactly one"):
        model(past_key_values=cache)
    with pytest.raises(ValueError, match="labels"):
        model(ids[:, :3], labels=ids, past_key_values=cache)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids[:, :3], logits_to_keep=-1, past_key_values=cache)
    with pytest.raises(ValueError, match="batch"):
        model(ids[:, :3].repeat(2, 1), past_key_values=cache)
    assert cache.get_seq_length() == 20


def test_signature_kept_for_generate():
    import inspect
    model = chunkinfer.convert(make_model("llama"))
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    assert model._supports_logits_to_keep()
