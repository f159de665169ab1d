"""Models spread over devices by accelerate (device maps, offload hooks) vs the stock forward on the same model.

CPU: accelerate's hooks on a map of layer-sized entries (all "cpu", hooks forced), layers offloaded to
disk, cpu_offload, from_pretrained(device_map=...); a layout faked over two "devices" counts the moves
of the residual stream. CUDA (marked): cuda:0 + cpu maps, as real splits and as accelerate offload.
"""
from __future__ import annotations

import copy

import pytest
import torch

import chunkinfer
from chunkinfer.loop import layer as layer_ops
from chunkinfer.planner.devices import plan_devices
from chunkinfer.models.devices import ModelDevices
from chunkinfer.tools.verify import reference_step_logits
from tests.tiny_models import left_padded_batch, make_model, max_rel_err

accelerate = pytest.importorskip("accelerate")
from accelerate import cpu_offload, dispatch_model  # noqa: E402
from accelerate.hooks import AlignDevicesHook, add_hook_to_module  # noqa: E402

CUDA = torch.cuda.is_available()


def cuda_test(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(fn))


def layer_map(n_layers: int, first, rest, split: int, *, embed=None, head=None) -> dict:
    """Layers [0, split) on ``first``, the others on ``rest``; embedding with the first, norm and head
    with the rest unless given."""
    dmap = {"model.embed_tokens": first if embed is None else embed, "model.rotary_emb": first}
    dmap.update({f"model.layers.{i}": first if i < split else rest for i in range(n_layers)})
    dmap.update({"model.norm": rest if head is None else head, "lm_head": rest if head is None else head})
    return dmap


def stock_then_converted(model, ids, mask, *, chunk: int, new_tokens: int = 8, labels=None):
    """(stock logits, stock loss, stock greedy tokens, converted logits, converted loss, converted tokens)."""
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, labels=labels)
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    chunkinfer.convert(model, chunk_size=chunk)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return ref, ref_gen, out, gen


def assert_matches(ref, ref_gen, out, gen, mask):
    assert out.logits.device == ref.logits.device
    assert max_rel_err(out.logits, ref.logits, mask.to(ref.logits.device)) < 1e-4
    if ref.loss is not None:
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * abs(ref.loss.item())
    assert torch.equal(gen, ref_gen)


# ---- CPU ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_dispatched_map_matches_stock_and_revert_keeps_hooks(arch):
    model = make_model(arch, layers=4)
    dispatch_model(model, layer_map(4, "cpu", "cpu", 2), force_hooks=True)
    assert model._hf_hook.io_same_device
    ids, mask = left_padded_batch(2, 100, [0, 29])
    labels = ids.masked_fill(mask == 0, -100)
    ref, ref_gen, out, gen = stock_then_converted(model, ids, mask, chunk=32, labels=labels)  # 32 does not divide 100
    assert_matches(ref, ref_gen, out, gen, mask)

    # the converted forward runs inside accelerate's top-level hook; revert() puts the stock one back there
    assert "forward" in vars(model) and type(model._old_forward).__name__ == "ConvertedForward"
    chunkinfer.revert(model)
    assert model._old_forward.__func__ is type(model).forward and model._hf_hook.io_same_device
    with torch.no_grad():
        again = model(ids, attention_mask=mask).logits
    assert torch.equal(again, ref.logits)


def test_disk_offloaded_layers_match_stock(tmp_path):
    model = make_model("llama", layers=4)
    dispatch_model(model, layer_map(4, "cpu", "disk", 2, head="cpu") | {"model.norm": "disk"},
                   offload_dir=str(tmp_path))
    offloaded = model.model.layers[3].mlp.down_proj
    assert offloaded.weight.device.type == "meta"
    ids, mask = left_padded_batch(2, 90, [0, 13])
    ref, ref_gen, out, gen = stock_then_converted(model, ids, mask, chunk=40)
    assert_matches(ref, ref_gen, out, gen, mask)
    devices = model._chunkinfer.binding.devices
    assert set(devices.offloaded) == {2, 3, "final_norm"} and not devices.single
    assert offloaded.weight.device.type == "meta"  # loaded for the layer's time only
    # every layer runs on the CPU (disk is offload): the KV there is what the device plan predicts
    kv = plan_devices(model.config, 90, model.hf_device_map, batch=2, dtype=torch.float32).load("cpu")
    assert sum(layer.nbytes() for layer in out.past_key_values.layers) == kv.parts["KV resident"]
    # a call the loop does not handle runs the stock forward, through the hooks
    with pytest.warns(UserWarning, match="autograd is recording"):
        fallback = model(ids, attention_mask=mask).logits
    assert max_rel_err(fallback.detach(), ref.logits, mask) < 1e-6


def test_cpu_offload_hooks_on_every_module_match_stock():
    model = make_model("qwen3", layers=3)
    cpu_offload(model, execution_device="cpu")  # every weight, embedding and head included, on meta
    assert model.model.embed_tokens.weight.device.type == "meta"
    ids, mask = left_padded_batch(2, 70, [0, 9])
    ref, ref_gen, out, gen = stock_then_converted(model, ids, mask, chunk=16)
    assert_matches(ref, ref_gen, out, gen, mask)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_from_pretrained_device_map_with_disk_offload(tmp_path):
    stock = make_model("mistral", layers=4)  # sliding window 48 < the prompt
    stock.save_pretrained(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=layer_map(4, "cpu", "disk", 3), offload_folder=str(tmp_path / "offload"),
        dtype=torch.float32)
    assert loaded.hf_device_map["model.layers.3"] == "disk"
    loaded.config._attn_implementation = "sdpa"
    ids, mask = left_padded_batch(2, 120, [0, 31])
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask).logits
    ref_gen = stock.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    chunkinfer.convert(loaded, chunk_size=50)
    with torch.no_grad():
        out = loaded(ids, attention_mask=mask).logits
    assert max_rel_err(out, ref, mask) < 1e-4
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), ref_gen)


def test_token_logprobs_on_offloaded_model(tmp_path):
    model = make_model("llama", layers=3)
    ids, _ = left_padded_batch(2, 80, [0, 0])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    dispatch_model(model, layer_map(3, "cpu", "disk", 1), offload_dir=str(tmp_path))
    out = chunkinfer.token_logprobs(model, ids, chunk_size=32)
    assert (out - ref).abs().max().item() < 1e-4


def check_reference_step(model, n: int = 120):
    """verify.reference_step_logits (the million-token runs' check) on a spread model vs stock."""
    g = torch.Generator().manual_seed(torch.randint(0, 1 << 30, ()).item())
    ids = torch.randint(3, 256, (1, n + 1), generator=g)
    with torch.no_grad():
        ref = model(ids).logits[0, -1].double()
        chunkinfer.convert(model, chunk_size=50)
        cache = model(ids[:, :n], use_cache=True).past_key_values
    got = reference_step_logits(model, cache, ids[:, n:], dtype=torch.float64, kv_block=32)
    assert (got.cpu() - ref.cpu()).abs().max() <= 1e-4 * ref.abs().max().cpu()


def test_reference_step_on_a_dispatched_model():
    model = make_model("gemma3", layers=4)
    dispatch_model(model, layer_map(4, "cpu", "cpu", 2), force_hooks=True)
    check_reference_step(model)


def test_reference_step_refuses_offloaded_weights(tmp_path):
    model = make_model("llama", layers=2)
    dispatch_model(model, layer_map(2, "cpu", "disk", 1), offload_dir=str(tmp_path))
    chunkinfer.convert(model)
    with torch.no_grad():
        cache = model(torch.randint(3, 256, (1, 8)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="offloaded weights are not supported"):
        reference_step_logits(model, cache, torch.ones(1, 1, dtype=torch.long))


def test_residual_moves_once_per_device_boundary(monkeypatch):
    """Layers faked over two devices ("cpu" and "cpu:0" compare unequal, and both are the CPU): the
    residual stream crosses once per call, for a prompt of many chunks and for each decode step."""
    model = make_model("llama", layers=4)
    ids, mask = left_padded_batch(2, 100, [0, 19])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    chunkinfer.convert(model, chunk_size=16)  # 7 chunks per layer
    fake = [torch.device("cpu"), torch.device("cpu"), torch.device("cpu", 0), torch.device("cpu", 0)]
    monkeypatch.setattr(ModelDevices, "layers", property(lambda self: fake))
    crossings = []
    real = layer_ops.to_layer_device
    monkeypatch.setattr(layer_ops, "to_layer_device", lambda x, dev: (crossings.append(dev), real(x, dev))[1])
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert crossings == [torch.device("cpu", 0)]
    assert max_rel_err(out, ref, mask) < 1e-4
    crossings.clear()
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, ref_gen)
    assert len(crossings) == 6  # the prompt, then one per decode step (5)


def test_meta_weights_without_a_hook_are_refused():
    model = make_model("llama", layers=2)
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(128, 64, device="meta"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is on the meta device"):
        chunkinfer.convert(model)
    assert "forward" not in vars(model) and not chunkinfer.is_converted(model)


def test_offload_hook_above_the_decoder_layers_is_refused():
    model = make_model("llama", layers=2)
    weights = {n: p.detach().clone() for n, p in model.model.layers.named_parameters()}
    add_hook_to_module(model.model.layers, AlignDevicesHook(execution_device="cpu", offload=True,
                                                            weights_map=weights, place_submodules=True))
    with pytest.raises(ValueError, match="one decoder layer at a time"):
        chunkinfer.convert(model)
    assert not chunkinfer.is_converted(model)


def test_decoder_layer_over_two_devices_is_refused():
    model = make_model("llama", layers=2)
    mlp = model.model.layers[1].mlp.down_proj  # this one module "runs on cuda:0", the rest of the layer on the CPU
    add_hook_to_module(mlp, AlignDevicesHook(execution_device=torch.device("cuda", 0), offload=True,
                                             weights_map={"weight": mlp.weight.detach().clone()}))
    with pytest.raises(ValueError, match=r"decoder layer 1 has weights on \['cpu', 'cuda:0'\]"):
        chunkinfer.convert(model)
    assert not chunkinfer.is_converted(model)


def test_kv_offload_on_an_offloaded_model_is_refused(tmp_path):
    model = make_model("llama", layers=2)
    dispatch_model(model, layer_map(2, "cpu", "disk", 1), offload_dir=str(tmp_path))
    before = vars(model)["forward"], model._old_forward
    with pytest.raises(ValueError, match="kv_offload=True needs the whole model on one device"):
        chunkinfer.convert(model, kv_offload=True)
    assert (vars(model)["forward"], model._old_forward) == before and not chunkinfer.is_converted(model)


# ---- CUDA (the lead runs these on the H200) -------------------------------------------------------------

def _gpu_cpu_maps():
    # (device map, main_device): real splits (main "cpu": the cpu layers run on the CPU), and accelerate's
    # default reading of a cuda + cpu map (the cpu layers offloaded, run on cuda:0)
    return [
        pytest.param(layer_map(4, 0, "cpu", 2), "cpu", id="cuda-first-split"),
        pytest.param(layer_map(4, "cpu", 0, 2), "cpu", id="cpu-first-split"),
        pytest.param(layer_map(4, 0, "cpu", 1), None, id="cpu-offloaded-to-cuda"),
    ]


@cuda_test
@pytest.mark.parametrize("dmap,main", _gpu_cpu_maps())
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cuda_cpu_map_matches_stock(arch, dmap, main):
    model = make_model(arch, layers=4)
    if model.config.tie_word_embeddings:  # one tensor: stock transformers + accelerate need it on one device
        dmap = {**dmap, "lm_head": dmap["model.embed_tokens"], "model.norm": dmap["model.embed_tokens"]}
    dispatch_model(model, dmap, main_device=main)
    ids, mask = left_padded_batch(2, 300, [0, 77])
    ref, ref_gen, out, gen = stock_then_converted(model, ids, mask, chunk=128, new_tokens=10)
    assert_matches(ref, ref_gen, out, gen, mask)
    devices = model._chunkinfer.binding.devices.layers
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    assert [layer.k_buf.device for layer in cache.layers] == devices  # each layer's KV where it runs
    if main == "cpu":
        assert {d.type for d in devices} == {"cuda", "cpu"}
    else:
        assert all(d.type == "cuda" for d in devices)


@cuda_test
@pytest.mark.parametrize("dmap,main", _gpu_cpu_maps()[:1])
def test_cuda_bf16_split_decodes_without_graphs(dmap, main):
    model = make_model("llama", layers=4, dtype=torch.bfloat16, head_dim=64, hidden_size=128)
    dispatch_model(model, dmap, main_device=main)
    ids, mask = left_padded_batch(2, 200, [0, 40])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    chunkinfer.convert(model, chunk_size=64, cuda_graphs=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert len(model._chunkinfer.graphs) == 0  # a graph would need the whole model on one device
    first, ref_first = out.logits[0].float(), ref.logits[0].float()
    assert ((first - ref_first).abs().max() / ref_first.abs().max()).item() < 2e-2


@cuda_test
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_cuda_reference_step_on_a_cuda_cpu_split(arch):
    model = make_model(arch, layers=4)
    dispatch_model(model, layer_map(4, 0, "cpu", 2), main_device="cpu")
    check_reference_step(model, n=300)


@cuda_test
def test_cuda_from_pretrained_cuda_cpu_map(tmp_path):
    stock = make_model("qwen2", layers=4)
    stock.save_pretrained(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=layer_map(4, 0, "cpu", 2),
                                                  dtype=torch.float32)
    loaded.config._attn_implementation = "sdpa"
    ids, mask = left_padded_batch(2, 150, [0, 50])
    ids, mask = ids.cuda(), mask.cuda()
    ref, ref_gen, out, gen = stock_then_converted(loaded, ids, mask, chunk=64)
    assert_matches(ref, ref_gen, out, gen, mask)


@cuda_test
def test_cuda_decoder_layer_split_over_devices_is_refused():
    model = make_model("llama", layers=2)
    dmap = {k: v for k, v in layer_map(2, 0, 0, 2).items() if k != "model.layers.1"}
    dmap.update({f"model.layers.1.{m}": 0 for m in ("self_attn", "input_layernorm", "post_attention_layernorm")})
    dispatch_model(model, dmap | {"model.layers.1.mlp": "cpu"}, main_device="cpu")
    with pytest.raises(ValueError, match=r"decoder layer 1 has weights on \['cpu', 'cuda:0'\]"):
        chunkinfer.convert(model)
    assert not chunkinfer.is_converted(model)


@cuda_test
@pytest.mark.parametrize("main", ["cpu", None], ids=["split", "offloaded"])
def test_cuda_peak_within_device_plan(main):
    """Peak allocated on cuda:0 beyond the weights resident there <= plan_devices' prediction for cuda:0,
    and not far above it."""
    seq, chunk = 32768, 4096
    kw = dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
              vocab_size=32000, max_position_embeddings=seq + 64)
    model = make_model("llama", layers=4, dtype=torch.bfloat16, **kw)
    dmap = layer_map(4, 0, "cpu", 3 if main == "cpu" else 2)
    if main == "cpu":  # the CPU part small: only the last layer and the head there
        dmap.update({"model.norm": 0, "lm_head": 0})
    dispatch_model(model, dmap, main_device=main)
    chunkinfer.convert(model, chunk_size=chunk)
    predicted = plan_devices(model.config, seq, dmap, batch=1, dtype=torch.bfloat16, chunk_size=chunk,
                             main_device=main).load("cuda:0")
    ids = torch.randint(3, 32000, (1, seq), device="cuda:0")
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated(0) - ids.numel() * 8
    torch.cuda.reset_peak_memory_stats(0)
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, use_cache=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(0) - weights
    kv_here = sum(layer.nbytes() for layer in out.past_key_values.layers if layer.k_buf.device.type == "cuda")
    assert kv_here == predicted.parts["KV resident"]
    expect = predicted.peak_alloc_beyond_weights
    print(f"cuda:0 beyond weights: measured {measured / 2**20:.1f} MiB, predicted {expect / 2**20:.1f} MiB")
    assert out.logits.shape == (1, 1, 32000)
    assert measured <= expect
    assert expect <= 1.25 * measured + (256 << 20)
