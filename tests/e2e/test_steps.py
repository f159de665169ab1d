"""Steps on a cache (1 to 64 new tokens) and transformers' Cache semantics, against stock transformers.

Regression tests for what went wrong: assisted and prompt-lookup generation gave other tokens than
stock (crop(0) emptied the cache), a batched chat whose second turn pads after the first turn reused
the first turn's padding, a DynamicCache the user held stayed empty, a step of 2-64 tokens ran the
prefill kernels.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import chunkinfer
from chunkinfer import ChunkKVCache
from chunkinfer.loop.step import STEP_TOKENS
from tests.tiny_models import ARCHS, left_padded_batch, make_model, max_rel_err


def _pair(arch="llama", chunk=32, **kw):
    stock = make_model(arch, **kw)
    ours = chunkinfer.convert(make_model(arch, **kw), chunk_size=chunk)
    return stock, ours


def _cache_of(out):
    return out.past_key_values


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("t", [1, 2, 5, STEP_TOKENS])
def test_step_of_t_tokens_matches_stock(arch, t):
    stock, ours = _pair(arch)
    ids, mask = left_padded_batch(2, 90 + t, [0, 7])
    p = 90
    ref = stock(ids[:, :p], attention_mask=mask[:, :p], use_cache=True)
    out = ours(ids[:, :p], attention_mask=mask[:, :p], use_cache=True)
    ref2 = stock(ids[:, p:], attention_mask=mask, past_key_values=_cache_of(ref))
    out2 = ours(ids[:, p:], attention_mask=mask, past_key_values=_cache_of(out))
    assert out2.logits.shape == ref2.logits.shape
    assert max_rel_err(out2.logits, ref2.logits) < 1e-4
    assert _cache_of(out2).get_seq_length() == p + t


@torch.no_grad()
def test_step_runs_the_decode_kernels_not_the_prefill(monkeypatch):
    stock, ours = _pair()
    ids = torch.randint(3, 200, (1, 50))
    out = ours(ids[:, :40], use_cache=True)
    from chunkinfer.loop import prefill

    def refuse(*a, **k):
        raise AssertionError("a step ran the chunked prefill")

    monkeypatch.setattr(prefill, "run_layers", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor the stock forward
        step = ours(ids[:, 40:], past_key_values=out.past_key_values)
    assert step.logits.shape == (1, 10, 256)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup_and_assistant_give_stock_tokens(arch):
    stock, ours = _pair(arch)
    # a prompt that repeats itself, so that prompt lookup finds drafts
    base = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([base, base[:, 5:30], base[:, 2:20]], dim=1)
    kw = dict(max_new_tokens=24, do_sample=False)
    plain = ours.generate(ids, **kw)
    assert torch.equal(plain, stock.generate(ids, **kw))
    looked = ours.generate(ids, prompt_lookup_num_tokens=5, **kw)
    assert torch.equal(looked, plain)
    assert torch.equal(looked, stock.generate(ids, prompt_lookup_num_tokens=5, **kw))
    assistant = make_model(arch, seed=5)  # another model: drafts it proposes are often rejected
    assisted = ours.generate(ids, assistant_model=assistant, **kw)
    assert torch.equal(assisted, plain)


@torch.no_grad()
def test_assisted_with_the_model_itself_accepts_every_draft():
    stock, ours = _pair()
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(4))
    plain = ours.generate(ids, max_new_tokens=20, do_sample=False)
    twin = chunkinfer.convert(make_model("llama"), chunk_size=32)  # the same weights: every draft accepted
    assert torch.equal(ours.generate(ids, assistant_model=twin, max_new_tokens=20, do_sample=False), plain)


@torch.no_grad()
def test_crop_follows_the_installed_transformers():
    stock, ours = _pair()
    ids = torch.randint(3, 200, (1, 30))
    cache = ours(ids, use_cache=True).past_key_values
    ref = stock(ids, use_cache=True).past_key_values
    for n in (0, -4, -100):
        cache.crop(n)
        ref.crop(n)
        assert cache.get_seq_length() == ref.get_seq_length()
    cache = ours(ids, use_cache=True).past_key_values
    ref = stock(ids, use_cache=True).past_key_values
    layer = DynamicLayer()
    layer.keys = layer.values = torch.empty(1, 1, 30, 1, device="meta")  # not empty: 5.17 counts numel
    layer.is_initialized = True
    try:
        layer.crop(10)
    except ValueError as exc:  # transformers >= 5.18: positive values are refused
        with pytest.raises(ValueError, match="positive"):
            cache.crop(10)
        assert "positive" in str(exc)
    else:  # 5.17: the legacy meaning, keep that many
        cache.crop(10)
        ref.crop(10)
        assert cache.get_seq_length() == ref.get_seq_length() == 10


@torch.no_grad()
def test_batched_chat_second_turn_padding_is_read_from_the_mask():
    stock, ours = _pair()
    ids, mask = left_padded_batch(2, 60, [0, 9])
    ref1 = stock(ids, attention_mask=mask, use_cache=True)
    out1 = ours(ids, attention_mask=mask, use_cache=True)
    # second turn: sequence 0 pads 3 tokens after its first turn
    turn = torch.randint(3, 200, (2, 8))
    mask2 = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    mask2[0, 60:63] = 0
    ref2 = stock(turn, attention_mask=mask2, past_key_values=ref1.past_key_values)
    with pytest.warns(UserWarning, match="zeros between ones"):
        out2 = ours(turn, attention_mask=mask2, past_key_values=out1.past_key_values)
    assert max_rel_err(out2.logits, ref2.logits, mask2[:, 60:]) < 1e-4


@torch.no_grad()
def test_left_padded_generate_then_mask_change_is_honoured():
    stock, ours = _pair("qwen2")
    ids, mask = left_padded_batch(2, 40, [0, 6])
    kw = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), stock.generate(ids, attention_mask=mask, **kw))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_users_dynamic_cache_is_filled_in_place(arch):
    stock, ours = _pair(arch)
    ids = torch.randint(3, 200, (1, 40))
    theirs = DynamicCache()
    ours(ids, past_key_values=theirs, use_cache=True)
    assert theirs.get_seq_length() == 40 and isinstance(theirs, DynamicCache)
    ref_cache = DynamicCache()
    stock(ids, past_key_values=ref_cache, use_cache=True)
    nxt = torch.randint(3, 200, (1, 1))
    kw = dict(max_new_tokens=8, do_sample=False)
    got = ours.generate(torch.cat([ids, nxt], 1), past_key_values=theirs, **kw)
    want = stock.generate(torch.cat([ids, nxt], 1), past_key_values=ref_cache, **kw)
    assert torch.equal(got, want)
    assert theirs.get_seq_length() == ref_cache.get_seq_length()


@torch.no_grad()
def test_dynamic_cache_filled_by_stock_is_continued():
    stock, ours = _pair()
    ids = torch.randint(3, 200, (1, 48))
    cache = DynamicCache()
    stock(ids[:, :40], past_key_values=cache, use_cache=True)
    ref = stock(ids[:, 40:], past_key_values=stock(ids[:, :40], use_cache=True).past_key_values).logits
    out = ours(ids[:, 40:], past_key_values=cache).logits
    assert max_rel_err(out, ref) < 1e-4 and isinstance(cache, ChunkKVCache)


@torch.no_grad()
def test_beam_search_and_seeded_sampling_match_stock():
    stock, ours = _pair("mistral")
    ids, mask = left_padded_batch(2, 30, [0, 4])
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), stock.generate(ids, attention_mask=mask, **kw))
    torch.manual_seed(11)
    a = stock.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(11)
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
    assert torch.equal(a, b)


@torch.no_grad()
def test_config_output_attentions_takes_the_stock_path():
    stock, ours = _pair()
    ids = torch.randint(3, 200, (1, 20))
    for m in (stock, ours):
        m.set_attn_implementation("eager")  # stock returns attention weights only from eager attention
        m.config.output_attentions = True
    with pytest.warns(UserWarning, match="output_attentions"):
        out = ours(ids)
    ref = stock(ids)
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions)


@torch.no_grad()
def test_cache_of_another_model_or_batch_is_refused_before_work():
    _, ours = _pair()
    ids = torch.randint(3, 200, (2, 20))
    for other, match in ((make_model("llama", num_key_value_heads=1), "another model"),
                         (make_model("llama", layers=4), "4 layers")):
        cache = chunkinfer.convert(other, chunk_size=32)(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=match):
            ours(ids[:, :1], past_key_values=cache)
        assert cache.get_seq_length() == 20
    mine = ours(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="batch"):
        ours(ids[:1, :1], past_key_values=mine)
    assert mine.get_seq_length() == 20


@torch.no_grad()
def test_prompt_with_drafts_appended_splits_prefill_and_step():
    """generate()'s first assisted call holds the prompt and the drafts, logits_to_keep = drafts + 1: the
    prompt runs the prefill, the drafts a step, as plain decoding computes them."""
    stock, ours = _pair()
    ids = torch.randint(3, 200, (1, 70))
    ref = stock(ids, logits_to_keep=6).logits
    out = ours(ids, logits_to_keep=6, use_cache=True)
    assert out.logits.shape == ref.shape and max_rel_err(out.logits, ref) < 1e-4
    assert out.past_key_values.get_seq_length() == 70


@torch.no_grad()
def test_beam_reorder_keeps_padding_per_row():
    stock, ours = _pair()
    ids, mask = left_padded_batch(3, 30, [0, 5, 2])
    out = ours(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert cache.key_starts == [2, 0, 5]


# ---- on the GPU: bit-identical speculation (bf16) ----

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_model(arch: str):
    extra = dict(query_pre_attn_scalar=64) if arch == "gemma3" else {}
    return chunkinfer.convert(make_model(arch, dtype=torch.bfloat16, device="cuda", random_norms=True, hidden_size=256,
                                         intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                                         head_dim=64, layers=4, **extra))


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("graphs", [True, False])
@torch.no_grad()
def test_t_token_step_rows_equal_one_token_steps_bit_for_bit(arch, graphs):
    model = _gpu_model(arch)
    model._chunkinfer.cuda_graphs = graphs
    ids = torch.randint(3, 250, (1, 3000), device="cuda")
    cache = model(ids[:, :2990], use_cache=True).past_key_values
    step = model(ids[:, 2990:], past_key_values=cache, logits_to_keep=10).logits
    cache.crop(-10)
    for t in range(10):
        one = model(ids[:, 2990 + t:2991 + t], past_key_values=cache).logits
        assert torch.equal(one[:, 0], step[:, t]), f"row {t}"


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_speculative_tokens_equal_greedy_bit_for_bit_on_the_gpu(arch):
    from chunkinfer.tools.replay import ReplayAssistant

    model = _gpu_model(arch)
    base = torch.randint(3, 250, (1, 1500), device="cuda", generator=None)
    ids = torch.cat([base, base[:, 200:900]], dim=1)  # repeats itself: prompt lookup finds drafts
    kw = dict(max_new_tokens=160, min_new_tokens=160, do_sample=False)
    plain = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=8, **kw), plain)
    replay = ReplayAssistant.of(model, ids, plain[:, ids.shape[1]:], drafts=8)
    assert torch.equal(model.generate(ids, assistant_model=replay, **kw), plain)
