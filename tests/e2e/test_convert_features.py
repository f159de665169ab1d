"""Forward features of a converted model, each against the stock model on the same inputs."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache

import chunkinfer
from chunkinfer import ChunkKVCache
from tests.tiny_models import left_padded_batch, make_model, max_rel_err


def _pair(arch="llama", chunk=24):
    stock = make_model(arch)
    ours = chunkinfer.convert(make_model(arch), chunk_size=chunk)
    return stock, ours


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 5, 0, 500])
def test_logits_to_keep_int(keep):
    stock, ours = _pair()
    ids, mask = left_padded_batch(2, 70, [0, 9])
    ref = stock(ids, attention_mask=mask, logits_to_keep=keep).logits
    out = ours(ids, attention_mask=mask, logits_to_keep=keep).logits
    assert out.shape == ref.shape
    rows = mask[:, -ref.shape[1]:]
    assert max_rel_err(out, ref, rows) < 1e-4


@torch.no_grad()
def test_logits_to_keep_tensor():
    stock, ours = _pair()
    ids, _ = left_padded_batch(1, 50, [0])
    keep = torch.tensor([3, 17, 49])
    ref, out = stock(ids, logits_to_keep=keep).logits, ours(ids, logits_to_keep=keep).logits
    assert out.shape == ref.shape and max_rel_err(out, ref) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_labels_loss_matches_stock(arch):
    stock, ours = _pair(arch)
    ids, mask = left_padded_batch(2, 90, [0, 13])
    labels = ids.masked_fill(mask == 0, -100)
    ref = stock(ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4 * abs(ref.loss.item())
    n = torch.tensor(57)
    ref_n = stock(ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    out_n = ours(ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    assert abs(out_n.item() - ref_n.item()) < 1e-4 * abs(ref_n.item())


@torch.no_grad()
def test_hidden_states_and_inputs_embeds_and_position_ids():
    stock, ours = _pair("qwen3")
    ids, _ = left_padded_batch(1, 60, [0])
    emb = stock.model.embed_tokens(ids)
    pos = torch.arange(5, 65)[None]
    ref = stock(inputs_embeds=emb, position_ids=pos, output_hidden_states=True)
    out = ours(inputs_embeds=emb, position_ids=pos, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for h_out, h_ref in zip(out.hidden_states, ref.hidden_states):
        assert max_rel_err(h_out, h_ref) < 1e-4
    assert max_rel_err(out.logits, ref.logits) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_second_prompt_continues_cache(arch):
    stock, ours = _pair(arch, chunk=16)
    ids, mask = left_padded_batch(2, 100, [0, 11])
    a, b = ids[:, :60], ids[:, 60:]
    ref1 = stock(a, attention_mask=mask[:, :60], use_cache=True)
    ref2 = stock(b, attention_mask=mask, past_key_values=ref1.past_key_values)
    out1 = ours(a, attention_mask=mask[:, :60], use_cache=True)
    assert isinstance(out1.past_key_values, ChunkKVCache)
    assert out1.past_key_values.get_seq_length() == 60
    out2 = ours(b, attention_mask=mask, past_key_values=out1.past_key_values)
    assert max_rel_err(out2.logits, ref2.logits, mask[:, 60:]) < 1e-4


@torch.no_grad()
def test_stock_dynamic_cache_is_continued_in_place_as_stock_does():
    stock, ours = _pair()
    ids, _ = left_padded_batch(1, 80, [0])
    dc = stock(ids[:, :50], use_cache=True).past_key_values
    assert isinstance(dc, DynamicCache)
    k0 = dc.layers[0].keys.clone()
    ref_cache = _copy_dynamic(dc)
    ref = stock(ids[:, 50:], past_key_values=ref_cache).logits
    out = ours(ids[:, 50:], past_key_values=dc).logits
    assert max_rel_err(out, ref) < 1e-4
    # the object passed holds the K, V after the call, as stock's does
    assert dc.get_seq_length() == ref_cache.get_seq_length() == 80 and isinstance(dc, DynamicCache)
    assert torch.equal(dc.layers[0].keys[:, :, :50], k0)


def _copy_dynamic(dc: DynamicCache) -> DynamicCache:
    new = DynamicCache()
    for i, layer in enumerate(dc.layers):
        new.update(layer.keys.clone(), layer.values.clone(), i)
    return new


@torch.no_grad()
def test_same_dynamic_cache_passed_twice_continues():
    stock, ours = _pair()
    ids, _ = left_padded_batch(1, 40, [0])
    dc_ref, dc_ours = DynamicCache(), DynamicCache()
    stock(ids[:, :30], past_key_values=dc_ref)
    ref = stock(ids[:, 30:], past_key_values=dc_ref).logits
    ours(ids[:, :30], past_key_values=dc_ours)
    out = ours(ids[:, 30:], past_key_values=dc_ours).logits
    assert max_rel_err(out, ref) < 1e-4


@torch.no_grad()
def test_use_cache_false_and_return_tuple():
    stock, ours = _pair()
    ids, _ = left_padded_batch(1, 30, [0])
    out = ours(ids, use_cache=False)
    assert out.past_key_values is None
    tup = ours(ids, use_cache=False, return_dict=False)
    ref = stock(ids, use_cache=False, return_dict=False)
    assert isinstance(tup, tuple) and max_rel_err(tup[0], ref[0]) < 1e-4


@torch.no_grad()
def test_decode_steps_reuse_cache_buffers():
    _, ours = _pair()
    ids, _ = left_padded_batch(1, 30, [0])
    out = ours(ids, use_cache=True)
    cache = out.past_key_values
    buf = cache.layers[0].k_buf
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(5):
        out = ours(nxt, past_key_values=cache)
        nxt = out.logits[:, -1:].argmax(-1)
    assert cache.layers[0].k_buf is buf  # no reallocation per token
    assert cache.get_seq_length() == 35


def test_unsupported_call_falls_back_to_stock_with_warning():
    stock, ours = _pair()
    ids, _ = left_padded_batch(1, 30, [0])
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions"):
        out = ours(ids, output_attentions=True)
    ref = stock(ids, output_attentions=True)
    assert out.attentions is not None and max_rel_err(out.logits, ref.logits) < 1e-4


def test_grad_recording_runs_stock_path():
    _, ours = _pair()
    ids, _ = left_padded_batch(1, 30, [0])
    with pytest.warns(UserWarning, match="autograd"):
        out = ours(ids, labels=ids)
    out.loss.backward()
    assert ours.lm_head.weight.grad is not None


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_token_logprobs_match_stock_log_softmax(arch):
    stock = make_model(arch)
    ids, _ = left_padded_batch(2, 120, [0, 0])
    ref = torch.log_softmax(stock(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = chunkinfer.token_logprobs(stock, ids, chunk_size=35)
    assert not chunkinfer.is_converted(stock)
    assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-4
