"""chunkinfer.planner.devices: per-device peaks for a model spread by a device map, against plan() on one
device, against a real model's parameters and KV arithmetic, accelerate's offload reading, errors."""
from __future__ import annotations

import pytest
import torch
import transformers

from chunkinfer.planner.devices import device_name, plan_devices, split_layers
from chunkinfer.planner.plan import plan

GiB = 1 << 30


def llama8b(**kw):
    return transformers.LlamaConfig(**{**dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
                                       **kw})


def small_model(tied: bool = False):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("seq", [4096, 131072, 1048576])
def test_one_device_map_is_plan(seq):
    cfg = llama8b()
    one = plan(cfg, seq, device_memory="139GiB", host_memory="1TiB", allow_offload=False)
    dp = plan_devices(cfg, seq, {"": 0}, budgets={"cuda:0": "139GiB"})
    assert dp.chunk_size == one.chunk_size and dp.kv_capacity == one.kv_capacity
    assert dp.load(0).parts == one.device_breakdown
    assert dp.fits == one.fits


@pytest.mark.parametrize("tied", [False, True])
def test_weights_per_device_are_the_model_parameters_there(tied):
    model = small_model(tied)
    dmap = split_layers(model.config, {0: 1, 1: 3})
    dp = plan_devices(model.config, 1000, dmap, dtype=torch.float32)
    for dev in ("cuda:0", "cuda:1"):
        prefixes = [k for k, v in dmap.items() if v == dev]
        here = {id(p): p for n, p in model.named_parameters(remove_duplicate=False)
                if any(n == k or n.startswith(k + ".") for k in prefixes)}
        assert dp.load(dev).parts["weights"] == sum(p.numel() * 4 for p in here.values()), dev
    assert dmap["lm_head"] == ("cuda:0" if tied else "cuda:1")


def test_kv_and_residual_per_device():
    cfg = llama8b()
    seq = 262144
    dp = plan_devices(cfg, seq, split_layers(cfg, {0: 10, 1: 22}), chunk_size=8192)
    cap = -(-(seq + 1024) // 256) * 256
    layer_kv = 2 * 8 * 128 * cap * 2  # K and V, 8 KV heads x 128, bf16
    d0, d1 = dp.load(0), dp.load(1)
    assert (d0.layers, d1.layers) == (list(range(10)), list(range(10, 32)))
    assert d0.parts["KV resident"] == 10 * layer_kv and d1.parts["KV resident"] == 22 * layer_kv
    assert d0.parts["residual stream"] == d1.parts["residual stream"] == seq * 4096 * 2 + 2 * seq * 8
    # the last layer only writes K, V for the prompt's rows: its device's work buffers are the smaller
    assert d1.parts["chunk work buffers"] < d0.parts["chunk work buffers"]


def test_budget_picks_the_chunk_and_names_the_device_that_does_not_fit():
    cfg = llama8b()
    dmap = split_layers(cfg, {0: 16, 1: 16})
    roomy = plan_devices(cfg, 1048576, dmap, budgets={0: "139GiB", 1: "139GiB"})
    assert roomy.fits and roomy.chunk_size == 8192
    peak_small = plan_devices(cfg, 1048576, dmap, chunk_size=1024).load(1).peak
    tight = plan_devices(cfg, 1048576, dmap, budgets={0: "139GiB", 1: peak_small + (1 << 20)})
    assert tight.fits and tight.chunk_size < roomy.chunk_size
    assert tight.load(1).peak <= tight.load(1).budget
    over = plan_devices(cfg, 1048576, dmap, budgets={0: "139GiB", 1: "80GiB"})
    assert not over.fits and over.chunk_size is None
    assert over.reason.startswith("cuda:1 needs") and "80.00 GiB" in over.reason
    assert "does NOT fit" in over.table()


def test_cpu_entries_are_offloaded_to_the_gpu_unless_the_main_device_is_cpu():
    cfg = llama8b()
    dmap = split_layers(cfg, {0: 20, "cpu": 12})
    offloaded = plan_devices(cfg, 65536, dmap)
    assert offloaded.main_device == "cuda:0" and offloaded.load(0).layers == list(range(32))
    assert offloaded.load("cpu").layers == [] and "KV resident" not in offloaded.load("cpu").parts
    head = 128256 * 4096 * 2  # the largest offloaded part: the LM head (bf16), loaded on cuda:0 for the head
    assert offloaded.load(0).parts["offloaded part loaded"] == head
    layer = (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096) * 2  # qkv, o, MLP, two norms
    assert offloaded.load("cpu").parts["weights"] == 12 * layer + 4096 * 2 + head
    split = plan_devices(cfg, 65536, dmap, main_device="cpu")
    assert split.load(0).layers == list(range(20)) and split.load("cpu").layers == list(range(20, 32))
    assert "offloaded part loaded" not in split.load(0).parts
    assert "allocator margin" not in split.load("cpu").parts


def test_split_layers_covers_the_model_for_accelerate():
    check_device_map = pytest.importorskip("accelerate.utils").check_device_map
    model = small_model()
    dmap = split_layers(model.config, {"cuda:0": 2, 1: 2})
    check_device_map(model, dmap)  # raises if a parameter is not placed
    assert [dmap[f"model.layers.{i}"] for i in range(4)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_bad_inputs():
    cfg = llama8b()
    dmap = split_layers(cfg, {0: 16, 1: 16})
    with pytest.raises(ValueError, match="inside decoder layer model.layers.3"):
        plan_devices(cfg, 1000, dmap | {"model.layers.3.mlp": 1})
    with pytest.raises(ValueError, match="does not place model.layers.31"):
        plan_devices(cfg, 1000, {k: v for k, v in dmap.items() if k != "model.layers.31"})
    with pytest.raises(ValueError, match="budgets name cuda:2"):
        plan_devices(cfg, 1000, dmap, budgets={2: "80GiB"})
    with pytest.raises(ValueError, match="places 31 layers; the model has 32"):
        split_layers(cfg, {0: 16, 1: 15})
    with pytest.raises(TypeError, match="device_map must be a non-empty dict"):
        plan_devices(cfg, 1000, [0, 1])
    with pytest.raises(ValueError, match="unsupported device 'mps'"):
        device_name("mps")
    assert [device_name(x) for x in (0, "cuda", torch.device("cuda", 3), "cpu", "disk")] == \
        ["cuda:0", "cuda:0", "cuda:3", "cpu", "disk"]
