"""Sliding-window rings, sinks and experts in whole models against stock transformers (fp32, CPU): prompts
several windows long in chunks that straddle the window, decode steps crossing a window boundary, few-token
steps, a stock cache with sliding layers continued, loss and token log-probs."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import chunkinfer
from tests.e2e.failing_call import raise_at_projection
from tests.tiny_models import left_padded_batch, make_model, max_rel_err

SLIDING = ["gemma3", "gpt_oss", "mistral"]  # windows 40, 24, 48


def _window(model) -> int:
    return model.config.sliding_window


@pytest.mark.parametrize("arch", SLIDING)
@pytest.mark.parametrize("chunk", [7, 64])  # a chunk much smaller than the window, and one larger
@torch.no_grad()
def test_several_windows_with_left_padding(arch, chunk):
    model = make_model(arch, layers=3)
    ids, mask = left_padded_batch(2, 9 * _window(model) + 5, [0, 61])
    ref = model(ids, attention_mask=mask).logits
    chunkinfer.convert(model, chunk_size=chunk)
    out = model(ids, attention_mask=mask, use_cache=True)
    assert max_rel_err(out.logits, ref, mask) < 1e-4
    for layer in out.past_key_values.layers:  # after the prompt: rings of window - 1, full layers everything
        assert layer.k_buf.shape[2] == (_window(model) - 1 if layer.window else layer.k_buf.shape[2])


@pytest.mark.parametrize("arch", SLIDING)
def test_generate_from_a_prompt_shorter_than_the_window_crosses_it(arch):
    """The ring grows step by step up to the window, then wraps (steps past the window boundary)."""
    model = make_model(arch, layers=3)
    w = _window(model)
    ids, mask = left_padded_batch(2, w - 9, [0, 5])
    kw = dict(attention_mask=mask, max_new_tokens=2 * w, do_sample=False)
    ref = model.generate(ids, **kw)
    chunkinfer.convert(model, chunk_size=16)
    assert torch.equal(model.generate(ids, **kw), ref)


@pytest.mark.parametrize("arch", ["gemma3", "gpt_oss"])
@torch.no_grad()
def test_few_token_steps_and_continuations_match_stock(arch):
    """Calls of 3 and 70 tokens on a cache past the window (a step, and a prompt continuation that
    straddles a window), against stock's run of the same calls on its own cache."""
    model = make_model(arch, layers=3)
    ids = torch.randint(3, 256, (1, 200))
    calls = [(0, 130), (130, 133), (133, 136), (136, 200)]
    stock_cache = DynamicCache(config=model.config)
    ref = [model(ids[:, a:b], past_key_values=stock_cache, use_cache=True).logits for a, b in calls]
    chunkinfer.convert(model, chunk_size=32)
    cache = None
    for (a, b), r in zip(calls, ref):
        out = model(ids[:, a:b], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        assert max_rel_err(out.logits, r) < 1e-4
    assert cache.get_seq_length() == 200


@pytest.mark.parametrize("arch", ["gemma3", "gpt_oss"])
@torch.no_grad()
def test_stock_cache_with_sliding_layers_is_continued(arch):
    model = make_model(arch, layers=3)
    ids = torch.randint(3, 256, (1, 150))
    stock_cache = DynamicCache(config=model.config)
    model(ids[:, :120], past_key_values=stock_cache, use_cache=True)
    ref = model(ids[:, 120:], past_key_values=stock_cache, use_cache=True).logits
    stock_cache = DynamicCache(config=model.config)
    model(ids[:, :120], past_key_values=stock_cache, use_cache=True)  # sliding layers hold window - 1
    chunkinfer.convert(model, chunk_size=32)
    out = model(ids[:, 120:], past_key_values=stock_cache, use_cache=True).logits
    assert max_rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe", "mixtral", "glm4"])
@torch.no_grad()
def test_loss_and_token_logprobs_several_windows(arch):
    model = make_model(arch, layers=3)
    ids = torch.randint(3, 256, (2, 230))
    ref = model(ids, labels=ids)
    ref_lp = torch.log_softmax(ref.logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    chunkinfer.convert(model, chunk_size=50)
    out = model(ids, labels=ids)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5 * ref.loss.item()
    assert (chunkinfer.token_logprobs(model, ids) - ref_lp).abs().max() < 1e-4


@pytest.mark.parametrize("arch", SLIDING)
@torch.no_grad()
def test_a_failed_continuation_leaves_the_rings_as_they_were(arch, monkeypatch):
    """A prompt continuation longer than a ring's room writes over the positions the ring holds; when the
    call fails in its last layer (after every ring was written), they are given back: the next calls
    equal those of a model whose call never failed, bit for bit."""
    import copy

    base = make_model(arch, layers=3)
    w = _window(base)
    good = chunkinfer.convert(copy.deepcopy(base), chunk_size=16)
    failing = chunkinfer.convert(copy.deepcopy(base), chunk_size=16)
    g = torch.Generator().manual_seed(3)
    prompt, more, step = (torch.randint(3, 250, (1, n), generator=g) for n in (2 * w + 3, 3 * w, 1))
    cache_good = good(prompt, use_cache=True).past_key_values
    cache = failing(prompt, use_cache=True).past_key_values
    raise_at_projection(monkeypatch, failing.model.layers[-1].self_attn.o_proj)
    with pytest.raises(RuntimeError, match="boom"):
        failing(more, past_key_values=cache, use_cache=True)
    monkeypatch.undo()
    assert cache.get_seq_length() == prompt.shape[1]
    assert torch.equal(good(more, past_key_values=cache_good, use_cache=True).logits,
                       failing(more, past_key_values=cache, use_cache=True).logits)
    assert torch.equal(good(step, past_key_values=cache_good, use_cache=True).logits,
                       failing(step, past_key_values=cache, use_cache=True).logits)
