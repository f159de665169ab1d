"""The planner on the new families: each layer's real KV (rings of the window for sliding layers, on the
device whatever the placement) and mixture-of-experts weights read per decode step."""
from __future__ import annotations

import torch
import transformers as T

import chunkinfer
from chunkinfer.planner.plan import plan
from chunkinfer.planner.rates import decode_bytes
from chunkinfer.planner.shape import Shape
from tests.tiny_models import make_model

GiB = 1 << 30


def _gemma3_12b():
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)]
    return T.Gemma3TextConfig(num_hidden_layers=48, hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=256, sliding_window=1024, layer_types=types,
                              vocab_size=262208, max_position_embeddings=262144)


def test_gemma3_plan_counts_rings_for_sliding_layers():
    p = plan(_gemma3_12b(), 131072, device_memory="139GiB", host_memory="500GiB")
    per_position = 2 * 8 * 256 * 2
    assert p.device_breakdown["KV resident"] == 8 * p.kv_capacity * per_position + 40 * 1023 * per_position
    assert any("40 of 48 layers slide" in n for n in p.notes)
    print(p.table())


def test_offload_moves_only_full_layers():
    p = plan(_gemma3_12b(), 131072, device_memory="139GiB", host_memory="500GiB", resident_layers=0)
    assert p.host_layers == [i for i in range(48) if (i + 1) % 6 == 0]
    assert len(p.resident_layers) == 40
    assert p.host_breakdown["KV on host"] == 8 * p.kv_capacity * 2 * 8 * 256 * 2


def test_decode_reads_only_the_chosen_experts():
    cfg = T.Qwen3MoeConfig(num_hidden_layers=48, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                           head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                           vocab_size=151936)
    shape = Shape.from_config(cfg)
    kv = 48 * 1000 * 2 * 4 * 128 * 2
    expert = 3 * 2048 * 768 * 2
    all_experts = decode_bytes(shape, 1000, 1000, 2) - 1000 * kv  # a batch that chooses every expert
    one_row = decode_bytes(shape, 1000, 1, 2) - kv
    assert all_experts - one_row == 48 * (128 - 8) * expert


def test_cpu_run_holds_what_the_plan_counts():
    """A converted tiny Gemma-3 (window 40): after the prompt each sliding layer holds 39 positions."""
    model = make_model("gemma3", layers=3)
    chunkinfer.convert(model, chunk_size=64)
    with torch.no_grad():
        out = model(torch.randint(3, 256, (1, 400)), use_cache=True)
    held = [layer.k_buf.shape[2] for layer in out.past_key_values.layers]
    p = plan(model.config, 400, device="cpu", device_memory="8GiB", process_baseline=0, dtype=torch.float32)
    per_position = 2 * 2 * 16 * 4
    assert held == [39, p.kv_capacity, 39]
    assert p.device_breakdown["KV cache"] == sum(held) * per_position
