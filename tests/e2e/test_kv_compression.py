"""convert(kv_offload=True, kv_compression="lossless"): host layers keep their K, V encoded, and every
output equals the uncompressed offload run's bit for bit (the same kernels read the same numbers)."""
from __future__ import annotations

import copy

import pytest
import torch

import chunkinfer
import chunkinfer.kv.transfer
from chunkinfer import ops
from chunkinfer.kv.encoded import KVCompression
from chunkinfer.kv.offload import EncodedKVLayer, HostKVLayer
from chunkinfer.loop.prefill import sample_kv
from tests.e2e.failing_call import continuation_survives_a_failure
from tests.tiny_models import left_padded_batch, make_model

pytestmark = pytest.mark.skipif(not chunkinfer.kv.transfer.available() or not ops.has_kernel("kv_encode_out", "CPU"),
                                reason="the compiled extension has no KV offload engine or codec")

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]
HD64 = dict(hidden_size=128, intermediate_size=256, head_dim=64)  # a head dim the CUDA decode kernel takes


def _pair(arch: str, device: str, layers: int = 4, model_kw: dict | None = None, compression="lossless",
          dtype: torch.dtype = torch.bfloat16, **kw):
    """(raw offload, compressed offload) copies of one bf16 (or fp16) model."""
    kw.setdefault("cpu_attention", False)
    base = make_model(arch, layers=layers, dtype=dtype, device=device, **(model_kw or {}))
    raw = chunkinfer.convert(copy.deepcopy(base), chunk_size=96, kv_offload=True, **kw)
    enc = chunkinfer.convert(copy.deepcopy(base), chunk_size=96, kv_offload=True, kv_compression=compression, **kw)
    return raw, enc


def _ids(b: int, s: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (b, s), generator=g).to(device)


def _same_host_kv(raw_cache, enc_cache) -> int:
    """Every encoded host layer decodes to the raw host layer's bits; returns how many were compared."""
    compared = 0
    for r, e in zip(raw_cache.layers, enc_cache.layers):
        assert isinstance(e, EncodedKVLayer) == isinstance(r, HostKVLayer)
        if isinstance(e, EncodedKVLayer):
            n = e.length
            assert torch.equal(e.k_enc.decoded(n).cpu().view(torch.int16), r.k_buf[:, :, :n].view(torch.int16))
            assert torch.equal(e.v_enc.decoded(n).cpu().view(torch.int16), r.v_buf[:, :, :n].view(torch.int16))
            compared += 1
    return compared


def _same_steps(raw, a, enc, b, n: int) -> None:
    """n greedy one-token steps of both models from their prompt outputs a, b: equal logits each time."""
    tok = a.logits[:, -1:].argmax(-1)
    for _ in range(n):
        sa = raw(tok, past_key_values=a.past_key_values, use_cache=True)
        sb = enc(tok, past_key_values=b.past_key_values, use_cache=True)
        assert torch.equal(sa.logits, sb.logits)
        tok = sa.logits.argmax(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_resident", [0, 2])
@pytest.mark.parametrize("compression", ["lossless", KVCompression(escape_capacity=0), KVCompression(device_layers=1)],
                         ids=["calibrated", "spilling", "one-on-device"])
@torch.no_grad()
def test_prefill_continuation_and_steps_equal_uncompressed(device, n_resident, compression):
    """A prompt, a continuation that grows the host regions, steps of 1 and 3 tokens: the same logits as
    the raw offload run, and the host K, V decode to its bits. ``escape_capacity=0``: every block with
    an escape spills, so the spill pool grows and its indices are rebased on every store. ``device_layers=1``:
    the first streamed layer keeps its blocks in the device's memory (here the CPU's), the rest on the host."""
    raw, enc = _pair("llama", device, resident_layers=n_resident, compression=compression)
    ids = _ids(2, 300, device, seed=torch.randint(0, 1 << 30, ()).item())
    a, b = raw(ids, use_cache=True), enc(ids, use_cache=True)
    assert torch.equal(a.logits, b.logits)
    more = _ids(2, 1400, device, seed=7)
    a2 = raw(more, past_key_values=a.past_key_values, use_cache=True)
    b2 = enc(more, past_key_values=b.past_key_values, use_cache=True)
    assert torch.equal(a2.logits, b2.logits)
    tok = a2.logits[:, -1:].argmax(-1)
    for t in (1, 3, 1):
        step = torch.cat([tok] * t, dim=1)
        sa = raw(step, past_key_values=a.past_key_values, use_cache=True)
        sb = enc(step, past_key_values=b.past_key_values, use_cache=True)
        assert torch.equal(sa.logits, sb.logits)
        tok = sa.logits[:, -1:].argmax(-1)
    assert _same_host_kv(a.past_key_values, b.past_key_values) == 4 - n_resident
    tiers = [layer.cpu_readable for layer in b.past_key_values.layers[n_resident:]]
    on_device = compression.device_layers if isinstance(compression, KVCompression) else 0
    assert tiers == [False] * on_device + [True] * (4 - n_resident - on_device)
    reports = b.past_key_values.kv_codec_report()
    assert [r.layer for r in reports] == list(range(n_resident, 4))
    for r in reports:
        assert r.k.lost_blocks == r.v.lost_blocks == 0
        if isinstance(compression, KVCompression) and compression.escape_capacity == 0:
            assert r.k.spilled_blocks + r.v.spilled_blocks > 0
        else:
            assert r.ratio > 1.1, r  # bf16: 8 + 4 bits an element before block costs
    assert b.past_key_values.host_kv_bytes() < a.past_key_values.host_kv_bytes()
    slots = 1 if isinstance(compression, KVCompression) and compression.device_layers else 2
    assert len(b.past_key_values.staging.slots) == slots and len(a.past_key_values.staging.slots) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
@torch.no_grad()
def test_generate_left_padded_batch_equal(device, arch):
    """Sliding-window layers keep their rings on the device; the full-attention ones are encoded."""
    raw, enc = _pair(arch, device, resident_layers=1)
    ids, mask = left_padded_batch(2, 150, [0, 37])
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    ga, gb = raw.generate(ids, **kw), enc.generate(ids, **kw)
    assert torch.equal(ga.sequences, gb.sequences)
    assert all(torch.equal(x, y) for x, y in zip(ga.logits, gb.logits))


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_cpu_attention_reads_the_encoded_host_kv(device):
    """Steps whose first positions are attended on the CPU read them from the encoded blocks
    (decode_attention_kv_codec): the same logits as the CPU reading raw host KV."""
    raw, enc = _pair("llama", device, resident_layers=1, cpu_attention=0.5, model_kw=HD64)
    ids = _ids(2, 700, device, seed=torch.randint(0, 1 << 30, ()).item())
    a, b = raw(ids, use_cache=True), enc(ids, use_cache=True)
    assert enc._chunkinfer.host.cpu_share.cpu_positions(700) >= 256, "the split must be active at this length"
    _same_steps(raw, a, enc, b, 3)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_a_layer_encoded_on_the_device_attends_as_a_resident_one(device):
    """Layer 1 kept encoded in the device's memory (no CPU share: the CPU cannot read it) against the same
    layer resident raw, with the CPU splitting the host layers' steps in both: the same logits."""
    base = make_model("llama", layers=4, dtype=torch.bfloat16, device=device, **HD64)
    kw = dict(chunk_size=96, kv_offload=True, cpu_attention=0.5)
    raw = chunkinfer.convert(copy.deepcopy(base), resident_layers=2, **kw)
    enc = chunkinfer.convert(base, resident_layers=1, kv_compression=KVCompression(device_layers=1), **kw)
    ids = _ids(2, 700, device, seed=torch.randint(0, 1 << 30, ()).item())
    a, b = raw(ids, use_cache=True), enc(ids, use_cache=True)
    assert torch.equal(a.logits, b.logits)
    assert [getattr(layer, "cpu_readable", None) for layer in b.past_key_values.layers] == [None, False, True, True]
    _same_steps(raw, a, enc, b, 3)


@torch.no_grad()
def test_token_logprobs_equal_uncompressed():
    raw, enc = _pair("llama", "cpu", resident_layers=1)
    ids = _ids(2, 700, "cpu", 11)
    assert torch.equal(chunkinfer.token_logprobs(raw, ids), chunkinfer.token_logprobs(enc, ids))


@torch.no_grad()
def test_failure_midway_keeps_the_encoded_cache_usable(monkeypatch):
    raw, enc = _pair("llama", "cpu", resident_layers=1, compression=KVCompression(escape_capacity=0))
    more = _ids(1, 1100, "cpu", 6)  # grows the host regions (200 + 1,024 headroom)
    a2, b2 = continuation_survives_a_failure(monkeypatch, raw, enc, _ids(1, 200, "cpu", 5), more,
                                             enc.model.layers[3].mlp.down_proj)
    assert torch.equal(a2.logits, b2.logits)
    _same_host_kv(a2.past_key_values, b2.past_key_values)


@torch.no_grad()
def test_the_calibration_sample_is_what_the_loop_writes():
    """sample_kv (the planner's measurement) gives layer 0's K, V of the first rows bit for bit."""
    model = chunkinfer.convert(make_model("llama", layers=2, dtype=torch.bfloat16), chunk_size=64)
    ids = _ids(2, 200, "cpu", 3)
    cache = model(ids, use_cache=True).past_key_values
    mb = model._chunkinfer.binding
    k, v = sample_kv(mb, mb.embed(ids[:, :100]), torch.arange(100)[None])
    assert torch.equal(k[:, :, :100], cache.layers[0].k_buf[:, :, :100])
    assert torch.equal(v[:, :, :100], cache.layers[0].v_buf[:, :, :100])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(kv_compression="lossless"), ValueError, "kv_offload=True"),
    (dict(kv_offload=True, kv_compression="zstd"), ValueError, "kv_compression"),
    (dict(kv_offload=True, kv_compression=True), ValueError, "kv_compression"),
])
def test_bad_arguments_leave_the_model_untouched(kw, exc, match):
    model = make_model("llama", layers=2, dtype=torch.bfloat16)
    with pytest.raises(exc, match=match):
        chunkinfer.convert(model, **kw)
    assert not hasattr(model, "_chunkinfer")


@torch.no_grad()
def test_float32_is_refused_at_convert_and_at_a_call():
    model = make_model("llama", layers=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16 / float16"):
        chunkinfer.convert(model, kv_offload=True, kv_compression="lossless")
    assert not hasattr(model, "_chunkinfer")
    model = chunkinfer.convert(model.to(torch.bfloat16), kv_offload=True, resident_layers=0,
                               kv_compression="lossless")
    model.float()
    with pytest.raises(ValueError, match="now runs in torch.float32"):
        model(_ids(1, 20, "cpu", 1), use_cache=True)


@torch.no_grad()
def test_a_failure_while_encoding_a_grown_layer_leaves_it_as_it_was(monkeypatch):
    """The continuation grows the host regions; encoding the second streamed layer's new blocks raises
    (e.g. out of host memory): that layer keeps its old blocks, and the next continuation equals a run
    that never failed."""
    from chunkinfer.kv import encoded

    raw, enc = _pair("llama", "cpu", resident_layers=1)
    ids, more = _ids(1, 200, "cpu", 5), _ids(1, 1100, "cpu", 6)
    a, b = raw(ids, use_cache=True), enc(ids, use_cache=True)
    store, calls = encoded.EncodedKV.store, []

    def failing(self, x, p0, p1):
        calls.append(p1)
        if len(calls) == 3:  # layer 2's K: after layer 1's K and V went to new blocks
            raise MemoryError("no host memory left")
        return store(self, x, p0, p1)

    monkeypatch.setattr(encoded.EncodedKV, "store", failing)
    with pytest.raises(MemoryError):
        enc(more, past_key_values=b.past_key_values, use_cache=True)
    monkeypatch.undo()
    assert calls[:3] == [1300, 1300, 1300] and b.past_key_values.get_seq_length() == 200
    _same_host_kv(a.past_key_values, b.past_key_values)
    a2 = raw(more, past_key_values=a.past_key_values, use_cache=True)
    b2 = enc(more, past_key_values=b.past_key_values, use_cache=True)
    assert torch.equal(a2.logits, b2.logits)


@torch.no_grad()
def test_the_float32_verification_reads_encoded_layers():
    """tools.verify.reference_step_logits (the capacity run's check) over an encoded cache: the same
    values as over the raw offload cache (it decodes the blocks, in ranges not aligned to the calls')."""
    from chunkinfer.tools.verify import reference_step_logits

    raw, enc = _pair("llama", "cpu", resident_layers=1, compression=KVCompression(device_layers=1))
    ids = _ids(1, 500, "cpu", 9)
    a, b = raw(ids, use_cache=True), enc(ids, use_cache=True)
    tok = a.logits[:, -1:].argmax(-1)
    ref_a = reference_step_logits(raw, a.past_key_values, tok, kv_block=72)
    ref_b = reference_step_logits(enc, b.past_key_values, tok, kv_block=72)
    assert torch.equal(ref_a, ref_b)
    assert b.past_key_values.get_seq_length() == 500  # read, not written


@torch.no_grad()
def test_a_pickled_copy_keeps_compressing():
    import pickle

    raw, enc = _pair("llama", "cpu", resident_layers=1, compression=KVCompression(escape_capacity=0))
    ids = _ids(1, 300, "cpu", 4)
    enc(ids)  # state built and used before the copy
    copy_ = pickle.loads(pickle.dumps(enc))
    out = copy_(ids, use_cache=True)
    assert copy_._chunkinfer.host.compression == KVCompression(escape_capacity=0)
    assert [type(layer) for layer in out.past_key_values.layers[1:]] == [EncodedKVLayer] * 3
    assert torch.equal(out.logits, raw(ids, use_cache=True).logits)


@torch.no_grad()
def test_float16_is_encoded_bit_for_bit():
    """fp16 K, V (5-bit exponents: 11 stored bits and a 4-bit code, at most 1.07x; at this tiny head dim
    the block headers and escapes eat that): the same outputs, nothing lost."""
    raw, enc = _pair("llama", "cpu", resident_layers=1, dtype=torch.float16)
    ids = _ids(1, 400, "cpu", 12)
    a, b = raw(ids, use_cache=True), enc(ids, use_cache=True)
    assert torch.equal(a.logits, b.logits)
    _same_steps(raw, a, enc, b, 2)
    assert _same_host_kv(a.past_key_values, b.past_key_values) == 3
    assert all(r.k.lost_blocks == r.v.lost_blocks == 0 for r in b.past_key_values.kv_codec_report())


@torch.no_grad()
def test_prompt_lookup_on_encoded_kv_gives_greedy_tokens():
    """Speculative steps (T-token verification, then transformers' crop of the rejected drafts) over
    encoded host layers whose every escaping block spills: the re-encoded last blocks and the pool they
    take back keep the tokens greedy's."""
    raw, enc = _pair("llama", "cpu", resident_layers=1, compression=KVCompression(escape_capacity=0))
    pattern = _ids(1, 40, "cpu", 0)
    ids = torch.cat([pattern, pattern, pattern[:, :20]], 1)  # repeats: the lookup drafts get accepted
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    greedy = raw.generate(ids, **kw)
    assert torch.equal(enc.generate(ids, prompt_lookup_num_tokens=6, **kw), greedy)
    assert torch.equal(enc.generate(ids, **kw), greedy)


@torch.no_grad()
def test_an_encoded_cache_of_another_batch_or_model_is_refused_before_any_work():
    """Every layer streamed and encoded (no raw buffer to read a shape from): a continuation with another
    batch, or by a model of another shape, raises before any work and leaves the cache as it was."""
    _, enc = _pair("llama", "cpu", resident_layers=0)
    cache = enc(_ids(2, 100, "cpu", 1), use_cache=True).past_key_values
    before = [layer.k_enc.decoded(100).clone() for layer in cache.layers]
    with pytest.raises(ValueError, match="holds batch 2, the input has batch 1"):
        enc(_ids(1, 5, "cpu", 2), past_key_values=cache, use_cache=True)
    other = chunkinfer.convert(make_model("llama", layers=4, dtype=torch.bfloat16, num_key_value_heads=4),
                               chunk_size=96, kv_offload=True, resident_layers=0, kv_compression="lossless")
    with pytest.raises(ValueError, match="filled by another model: layer 0 holds 2 KV heads"):
        other(_ids(2, 5, "cpu", 2), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 100
    assert all(torch.equal(b, layer.k_enc.decoded(100)) for b, layer in zip(before, cache.layers))
