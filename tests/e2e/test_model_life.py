"""The rest of a converted model's life, against stock transformers: float64, pickling and copies,
training mode with dropout, config flags, labels with logits_to_keep, right padding, autograd."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import chunkinfer
from chunkinfer import ChunkKVCache
from tests.tiny_models import left_padded_batch, make_model, max_rel_err


def _pair(arch="llama", chunk=24, **kw):
    stock = make_model(arch, **kw)
    ours = chunkinfer.convert(make_model(arch, **kw), chunk_size=chunk)
    return stock, ours


@torch.no_grad()
def test_float64_runs_the_stock_forward_with_a_warning():
    stock, ours = _pair(dtype=torch.float64)
    ids = torch.randint(3, 200, (1, 30))
    with pytest.warns(UserWarning, match="float64"):
        out = ours(ids).logits
    assert torch.equal(out, stock(ids).logits)
    ours.to(torch.float32)  # back to a dtype the loop runs
    stock.to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert max_rel_err(ours(ids).logits, stock(ids).logits) < 1e-4


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
@torch.no_grad()
def test_a_copy_stays_converted_with_its_settings(how):
    stock, ours = _pair()
    ids = torch.randint(3, 200, (2, 50))
    ours(ids)  # state built and used before the copy
    if how == "pickle":
        copy_ = pickle.loads(pickle.dumps(ours))
    elif how == "deepcopy":
        copy_ = copy.deepcopy(ours)
    else:
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        copy_ = torch.load(buf, weights_only=False)
    assert chunkinfer.is_converted(copy_) and copy_._chunkinfer.settings.chunk_size == 24
    out = copy_(ids, use_cache=True)
    assert isinstance(out.past_key_values, ChunkKVCache)  # the loop ran, not the class's stock forward
    assert copy_._chunkinfer.binding.embed is copy_.model.embed_tokens  # bound to the copy's own modules
    assert max_rel_err(out.logits, stock(ids).logits) < 1e-4
    chunkinfer.revert(copy_)
    assert not chunkinfer.is_converted(copy_) and "forward" not in vars(copy_)


@torch.no_grad()
def test_training_mode_with_dropout_runs_stock_and_eval_runs_the_loop():
    stock, ours = _pair(attention_dropout=0.5)
    ids = torch.randint(3, 200, (1, 40))
    ours.train()
    with pytest.warns(UserWarning, match="dropout"):
        a = ours(ids).logits
    b = ours(ids).logits
    assert not torch.equal(a, b), "dropout applied, as stock applies it"
    ours.eval()
    assert max_rel_err(ours(ids).logits, stock.eval()(ids).logits) < 1e-4
    ours.config.attention_dropout = 0.0
    ours.train()  # training mode without dropout: the loop's result is stock's
    assert max_rel_err(ours(ids).logits, stock(ids).logits) < 1e-4


@torch.no_grad()
def test_config_flags_are_honoured_like_their_keywords():
    stock, ours = _pair("qwen3")
    ids = torch.randint(3, 200, (1, 40))
    for m in (stock, ours):
        m.config.output_hidden_states = True
        m.config.use_cache = False
    ref, out = stock(ids), ours(ids)
    assert out.past_key_values is None is ref.past_key_values
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert max_rel_err(out.hidden_states[-1], ref.hidden_states[-1]) < 1e-4
    ours.config.return_dict = False  # stock's own inner model fails on config.return_dict=False: its keyword
    tup, ref_tup = ours(ids), stock(ids, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(ref_tup) and max_rel_err(tup[0], ref_tup[0]) < 1e-4
    for m in (stock, ours):
        m.config.output_hidden_states = False
        m.config.return_dict = True
        m.config.use_cache = True
    assert isinstance(ours(ids).past_key_values, ChunkKVCache)


@torch.no_grad()
def test_labels_with_logits_to_keep_fail_as_stock_fails():
    stock, ours = _pair()
    ids = torch.randint(3, 200, (1, 20))
    with pytest.raises(ValueError) as ref:
        stock(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError) as got:
        ours(ids, labels=ids, logits_to_keep=1)
    assert str(got.value) == str(ref.value)
    assert abs(ours(ids, labels=ids, logits_to_keep=20).loss - stock(ids, labels=ids).loss) < 1e-4


def right_padded_batch(lengths: list[int], seq: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (len(lengths), seq), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_right_padding_runs_the_loop_exactly(arch):
    stock, ours = _pair(arch)
    ids, mask = right_padded_batch([70, 51, 66], 70)
    labels = ids.masked_fill(mask == 0, -100)
    ref = stock(ids, attention_mask=mask, labels=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the loop, not the stock forward
        out = ours(ids, attention_mask=mask, labels=labels)
        lp = chunkinfer.token_logprobs(ours, ids, mask)
    assert max_rel_err(out.logits, ref.logits, mask) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4 * abs(ref.loss.item())
    want = torch.log_softmax(ref.logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    real = mask[:, 1:].bool()
    assert (lp - want)[real].abs().max() < 1e-4


@torch.no_grad()
def test_continuing_a_right_padded_cache_takes_the_stock_path():
    stock, ours = _pair()
    ids, mask = right_padded_batch([40, 31], 40)
    ref = stock(ids, attention_mask=mask, use_cache=True)
    out = ours(ids, attention_mask=mask, use_cache=True)
    nxt = torch.randint(3, 200, (2, 1))
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    want = stock(nxt, attention_mask=mask2, past_key_values=ref.past_key_values).logits
    with pytest.warns(UserWarning, match="zeros between ones"):
        got = ours(nxt, attention_mask=mask2, past_key_values=out.past_key_values).logits
    assert max_rel_err(got, want) < 1e-4


def test_autograd_warning_says_how_to_run_the_loop():
    _, ours = _pair()
    ids = torch.randint(3, 200, (1, 10))
    with pytest.warns(UserWarning, match=r"torch\.no_grad\(\) or torch\.inference_mode\(\)"):
        ours(ids)
