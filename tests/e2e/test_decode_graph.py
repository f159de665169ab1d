"""Decode with positions and lengths on the device (the step a CUDA graph captures) against stock."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import chunkinfer
from chunkinfer import forward
from chunkinfer.kv.ring import RING_DECODE
from chunkinfer.loop.decode_graph import step_logits
from chunkinfer.loop.step import DeviceStep, choose_split_keys, reserve
from chunkinfer.loop.step import device_step as step_on_device
from tests.tiny_models import left_padded_batch, make_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_hd64(arch: str, dtype, device):
    """Head dim 64, one the CUDA decode kernel takes (the default test models use 16)."""
    extra = dict(query_pre_attn_scalar=64) if arch == "gemma3" else {}
    return make_model(arch, dtype=dtype, device=device, random_norms=True, hidden_size=128,
                      intermediate_size=256, head_dim=64, **extra)


def device_step(cache, past: int, starts, b: int, device) -> DeviceStep:
    # seq_lens poisoned: the step derives them from the write index
    return DeviceStep(write_index=torch.tensor([past], device=device),
                      seq_lens=torch.full((b,), -7, dtype=torch.int32, device=device),
                      starts=None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device))


# gemma3's sliding layers are rings (kv/ring.py): the decode kernel must read them as such (RING_DECODE)
RING = pytest.mark.xfail(not RING_DECODE, strict=True, reason="decode_attention without ring semantics yet")


@pytest.mark.parametrize("arch", ["llama", "glm4", "qwen3_moe", "gemma3", "gpt_oss"])
@torch.no_grad()
def test_device_step_matches_stock_decode_on_cpu(arch):
    """The captured step's launches, run eagerly on the CPU kernels: same logits as stock's decode."""
    stock = model_hd64(arch, torch.float32, "cpu")
    ours = chunkinfer.convert(copy.deepcopy(stock), chunk_size=32)
    ids, mask = left_padded_batch(2, 70, [0, 9])
    ref = stock(ids, attention_mask=mask, use_cache=True)
    out = ours(ids, attention_mask=mask, use_cache=True)
    ref_cache, cache = ref.past_key_values, out.past_key_values
    nxt = ref.logits[:, -1:].argmax(-1)
    past = ids.shape[1]
    for _ in range(3):  # past the sliding window's edge too
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = (mask.long().cumsum(-1) - 1)[:, -1:]  # what generate() passes
        want = stock(nxt, attention_mask=mask, position_ids=pos, past_key_values=ref_cache).logits
        mb = ours._chunkinfer.binding
        reserve(mb, cache, 2, past + 1)
        cache.split_keys = cache.split_keys or choose_split_keys(mb, past + 1, 2, torch.device("cpu"))
        got = step_logits(mb, cache, nxt, None, pos, step_on_device(cache, past, 1, 2, cache.key_starts, "cpu"), 1)
        for layer in cache.layers:
            layer.length = past + 1
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        nxt, past = want[:, -1:].argmax(-1), past + 1


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", pytest.param("gemma3", marks=RING)])
@torch.no_grad()
def test_graph_decode_matches_eager_decode(arch):
    """Replayed graphs (lengths growing every step, a recapture when the cache grows) give the eager
    chunked loop's logits within bf16 rounding, for a left-padded batch."""
    base = model_hd64(arch, torch.bfloat16, "cuda")
    graphed = chunkinfer.convert(copy.deepcopy(base), chunk_size=64)
    eager = chunkinfer.convert(copy.deepcopy(base), chunk_size=64, cuda_graphs=False)
    ids, mask = left_padded_batch(2, 150, [0, 17])
    ids, mask = ids.cuda(), mask.cuda()
    out_g = graphed(ids, attention_mask=mask, use_cache=True)
    out_e = eager(ids, attention_mask=mask, use_cache=True)
    cache_g, cache_e = out_g.past_key_values, out_e.past_key_values
    nxt = out_e.logits[:, -1:].argmax(-1)
    captures = []
    for step in range(60):
        if step == 1:  # no spare capacity: the next step must grow the cache, so recapture
            for layer in cache_g.layers:
                layer.k_buf = layer.k_buf[:, :, : layer.length].clone()
                layer.v_buf = layer.v_buf[:, :, : layer.length].clone()
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = (mask.long().cumsum(-1) - 1)[:, -1:]
        lg = graphed(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache_g).logits
        le = eager(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache_e).logits
        captures.append(graphed._chunkinfer.graphs._by_batch[2].graph)
        err = ((lg.float() - le.float()).abs().max() / le.float().abs().max()).item()
        assert err < 2e-2, f"step {step}: {err}"
        nxt = le[:, -1:].argmax(-1)
    assert cache_g.get_seq_length() == cache_e.get_seq_length() == 150 + 60
    distinct = [g for i, g in enumerate(captures) if i == 0 or g is not captures[i - 1]]
    assert len(distinct) == 2, "expected one capture, and one recapture when the cache grew at step 1"
    assert captures[1] is not captures[0] and all(g is captures[1] for g in captures[1:])


@CUDA
@pytest.mark.cuda
@torch.no_grad()
def test_graph_generate_matches_eager_generate():
    """generate() through the captured graphs against the eager loop fed the same tokens (teacher
    forcing): bf16 with different attention kernels, so the logits agree within rounding at every
    step (comparing free-running token sequences would fail on any near-tie, which random weights have)."""
    base = model_hd64("llama", torch.bfloat16, "cuda")
    graphed = chunkinfer.convert(copy.deepcopy(base))
    eager = chunkinfer.convert(copy.deepcopy(base), cuda_graphs=False)
    ids = torch.randint(3, 256, (1, 300), device="cuda")
    n = 40
    g = graphed.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    assert g.sequences.shape[1] == 300 + n
    out = eager(ids, use_cache=True)
    for t in range(n):
        lg, le = g.logits[t][0].float(), out.logits[0, -1].float()
        err = ((lg - le).norm() / le.norm()).item()
        assert err < 2e-2, f"step {t}: {err}"
        out = eager(g.sequences[:, 300 + t:301 + t], past_key_values=out.past_key_values, use_cache=True)


class _GraphDecodeRecorder:
    """Stands in for forward._graph_decode on a CPU model (the graph needs CUDA): records the
    arguments, advances the cache as the replay would, and notes whether the general path ran."""

    def __init__(self, monkeypatch, model):
        self.calls, self.general = [], 0
        model._chunkinfer.cuda_graphs = True
        monkeypatch.setattr(model._chunkinfer.graphs, "supported", lambda *a: True)
        monkeypatch.setattr(forward, "_graph_decode", self.graph_decode)
        chunked = forward._chunked_forward

        def counted(*a, **k):
            self.general += 1
            return chunked(*a, **k)
        monkeypatch.setattr(forward, "_chunked_forward", counted)

    def graph_decode(self, state, cache, ids, pos, past, key_starts, mask_given, return_cache):
        self.calls.append((cache, ids, pos, past, key_starts, mask_given, return_cache))
        for layer in cache.layers:
            layer.length = past + 1
        cache.key_starts, cache.key_starts_known = key_starts, mask_given
        return CausalLMOutputWithPast(logits=torch.zeros(ids.shape[0], 1, 7), past_key_values=cache)


def _prompt(model, padded: bool):
    ids, mask = left_padded_batch(2, 40, [0, 5] if padded else [0, 0])
    out = model(ids, attention_mask=mask if padded else None, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1), mask


@pytest.mark.parametrize("form", ["positional", "keywords", "padded"])
@torch.no_grad()
def test_plain_decode_call_reaches_the_graph_as_the_general_path_would(monkeypatch, form):
    """generate()'s decode calls skip the signature binding and general checks, and hand the graph
    exactly what the general path would: the same cache, ids, length and padding."""
    model = make_model("llama")
    rec = _GraphDecodeRecorder(monkeypatch, chunkinfer.convert(model, chunk_size=16))
    runs = []
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(forward, "_plain_decode_step", lambda *a: None)
        cache, nxt, mask = _prompt(model, padded=form == "padded")
        rec.calls, rec.general = [], 0
        for _ in range(3):
            if form == "positional":
                out = model(nxt, past_key_values=cache)
            elif form == "keywords":
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1,
                            return_dict=True)
            else:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                out = model(nxt, past_key_values=cache, attention_mask=mask, use_cache=True)
            assert out.past_key_values is cache
        assert rec.general == (0 if shortcut else 3)
        assert all(c is cache for c, *_ in rec.calls)
        runs.append([(ids.tolist(), pos, past, ks, given, ret) for _, ids, pos, past, ks, given, ret in rec.calls])
    assert runs[0] == runs[1]
    assert [r[2] for r in runs[0]] == [40, 41, 42]
    assert all(r[3] == ([0, 5] if form == "padded" else None) for r in runs[0])


@torch.no_grad()
def test_other_decode_calls_take_the_general_path(monkeypatch):
    """Anything but the plain step goes through the general checks: positions given, a mask that is
    not past + 1 long, two tokens, float ids, a bool logits_to_keep, return_dict=False (tuple)."""
    model = make_model("llama")
    rec = _GraphDecodeRecorder(monkeypatch, chunkinfer.convert(model, chunk_size=16))
    cache, nxt, _ = _prompt(model, padded=False)
    rec.general = 0
    model(nxt, past_key_values=cache, position_ids=torch.tensor([[40], [40]]))
    assert rec.general == 1 and rec.calls[-1][2] is not None
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(nxt, past_key_values=cache, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a 2-D integer tensor"):
        model(nxt.float(), past_key_values=cache)
    with pytest.raises(ValueError, match="logits_to_keep must be an int"):
        model(nxt, past_key_values=cache, logits_to_keep=True)
    length = cache.get_seq_length()
    model(torch.cat([nxt, nxt], 1), past_key_values=cache)  # two tokens: the chunked loop, no graph
    assert cache.get_seq_length() == length + 2 and len(rec.calls) == 1
    general = rec.general
    tup = model(nxt, past_key_values=cache, return_dict=False)
    assert isinstance(tup, tuple) and tup[1] is cache and rec.general == general
