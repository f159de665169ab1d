"""Decode with positions and lengths on the device (the step a CUDA graph captures) against stock."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import chunkinfer
from chunkinfer.kv.ring import RING_DECODE
from chunkinfer.loop import step_path
from chunkinfer.loop.step import device_step, reserve, step_logits
from tests.tiny_models import left_padded_batch, make_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_hd64(arch: str, dtype, device):
    """Head dim 64, one the CUDA decode kernel takes (the default test models use 16)."""
    extra = dict(query_pre_attn_scalar=64) if arch == "gemma3" else {}
    return make_model(arch, dtype=dtype, device=device, random_norms=True, hidden_size=128,
                      intermediate_size=256, head_dim=64, **extra)


# gemma3's sliding layers are rings (kv/ring.py): the decode kernel must read them as such (RING_DECODE)
RING = pytest.mark.xfail(not RING_DECODE, strict=True, reason="decode_attention without ring semantics yet")


@pytest.mark.parametrize("arch", ["llama", "glm4", "qwen3_moe", "gemma3", "gpt_oss"])
@pytest.mark.parametrize("t", [1, 3])
@torch.no_grad()
def test_device_step_matches_stock_decode_on_cpu(arch, t):
    """The captured step's launches, run eagerly on the CPU kernels: same logits as stock's decode."""
    stock = model_hd64(arch, torch.float32, "cpu")
    ours = chunkinfer.convert(copy.deepcopy(stock), chunk_size=32)
    ids, mask = left_padded_batch(2, 70, [0, 9])
    ref = stock(ids, attention_mask=mask, use_cache=True)
    out = ours(ids, attention_mask=mask, use_cache=True)
    ref_cache, cache = ref.past_key_values, out.past_key_values
    mb = ours._chunkinfer.binding
    cache.split_keys = 256
    nxt = torch.randint(3, 250, (2, t))
    past = ids.shape[1]
    for _ in range(3):  # past the sliding window's edge too
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = (mask.long().cumsum(-1) - 1)[:, -t:]  # what generate() passes
        want = stock(nxt, attention_mask=mask, position_ids=pos, past_key_values=ref_cache).logits
        reserve(mb, cache, 2, past + t, t)
        got = step_logits(mb, cache, nxt, None, pos, device_step(cache, past, t, 2, cache.key_starts, "cpu"), t)
        for layer in cache.layers:
            layer.length = past + t
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        nxt, past = want.argmax(-1), past + t


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
        captures.append(graphed._chunkinfer.graphs.captured(2, 1, 1, (0, 17)).graph)
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


class _StepRecorder:
    """Stands in for the graphs on a CPU model (they need CUDA): records each step's arguments and runs
    it eagerly, and notes whether the chunked prefill ran."""

    def __init__(self, monkeypatch, model):
        self.calls, self.prefills = [], 0
        state = model._chunkinfer
        state.cuda_graphs = True
        monkeypatch.setattr(state.graphs, "supported", lambda *a: True)
        monkeypatch.setattr(state.graphs, "step", self.step)
        self.model = model
        from chunkinfer import forward
        real = forward.run_layers

        def counted(*a, **k):
            self.prefills += 1
            return real(*a, **k)
        monkeypatch.setattr(forward, "run_layers", counted)

    def step(self, mb, cache, ids, positions, past, key_starts, keep):
        self.calls.append((cache, ids.clone(), positions, past, key_starts, keep))
        b, t = ids.shape
        reserve(mb, cache, b, past + t)
        pos = torch.arange(past, past + t)[None] if positions is None else positions
        return step_logits(mb, cache, ids, None, pos, device_step(cache, past, t, b, key_starts, "cpu"), keep)


def _prompt(model, padded: bool):
    ids, mask = left_padded_batch(2, 40, [0, 5] if padded else [0, 0])
    out = model(ids, attention_mask=mask if padded else None, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1), mask


@pytest.mark.parametrize("form", ["positional", "keywords", "padded"])
@torch.no_grad()
def test_decode_calls_reach_the_graph_with_their_padding(monkeypatch, form):
    """generate()'s decode calls, however given, reach the graph with the same cache, length and the
    padding read from the mask; the prefill never runs for them."""
    model = make_model("llama")
    rec = _StepRecorder(monkeypatch, chunkinfer.convert(model, chunk_size=16))
    cache, nxt, mask = _prompt(model, padded=form == "padded")
    rec.calls, rec.prefills = [], 0
    for _ in range(3):
        if form == "positional":
            out = model(nxt, past_key_values=cache)
        elif form == "keywords":
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
        else:
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(nxt, past_key_values=cache, attention_mask=mask, use_cache=True)
        assert out.past_key_values is cache
    assert rec.prefills == 0 and all(c is cache for c, *_ in rec.calls)
    assert [c[3] for c in rec.calls] == [40, 41, 42]
    assert all(c[4] == ([0, 5] if form == "padded" else None) for c in rec.calls)


@torch.no_grad()
def test_steps_of_several_tokens_reach_the_graph_and_bad_calls_are_refused(monkeypatch):
    model = make_model("llama")
    rec = _StepRecorder(monkeypatch, chunkinfer.convert(model, chunk_size=16))
    cache, nxt, _ = _prompt(model, padded=False)
    rec.prefills = 0
    model(nxt, past_key_values=cache, position_ids=torch.tensor([[40], [40]]))
    assert rec.calls[-1][2] is not None
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(nxt, past_key_values=cache, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a 2-D integer tensor"):
        model(nxt.float(), past_key_values=cache)
    with pytest.raises(ValueError, match="logits_to_keep must be an int"):
        model(nxt, past_key_values=cache, logits_to_keep=True)
    length = cache.get_seq_length()
    out = model(torch.cat([nxt, nxt], 1), past_key_values=cache)  # two tokens: a step too
    assert cache.get_seq_length() == length + 2 and rec.calls[-1][1].shape == (2, 2) and out.logits.shape[1] == 2
    tup = model(nxt, past_key_values=cache, return_dict=False)
    assert isinstance(tup, tuple) and tup[1] is cache and rec.prefills == 0
