"""bench/bench_families.py's measuring loop on the CPU with tiny versions of its two shapes (the real ones
run on an H200): stock and chunkinfer rows, the cache bytes, decode times and the next-token check."""
from __future__ import annotations

import argparse

import torch
import transformers as T

from bench import bench_families


def _tiny_gemma3(max_positions):
    types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(3)]
    return T.Gemma3TextConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, sliding_window=32, layer_types=types,
                              vocab_size=256, max_position_embeddings=max_positions)


def _tiny_qwen3_moe(max_positions):
    return T.Qwen3MoeConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, vocab_size=256, max_position_embeddings=max_positions)


def test_rows_on_cpu(monkeypatch):
    monkeypatch.setattr(bench_families, "SHAPES", {"gemma3-12b": _tiny_gemma3, "qwen3-30b-a3b": _tiny_qwen3_moe})
    args = argparse.Namespace(skip_stock_above=10**9, decode_steps=3, chunk_size=64)
    with torch.inference_mode():
        for name in ("gemma3-12b", "qwen3-30b-a3b"):
            rows = bench_families.run_shape(name, [800], args, device="cpu", dtype=torch.float32)
            stock, ours = [r for r in rows if r["what"].endswith("prefill")]
            assert stock["what"] == "stock prefill" and ours["what"] == "chunkinfer prefill"
            for r in (stock, ours):
                assert r["error"] is None and r["seconds"] > 0 and r["decode_ms_per_token"] > 0
                assert r["step_bytes_read"] > 0 and r["kv_bytes_after_prefill"] > 0
            assert ours["same_next_token_as_stock"] is True
            if name == "gemma3-12b":  # two sliding layers of three: rings of 31 positions (+ headroom of the full one)
                assert ours["kv_bytes_after_prefill"] < stock["kv_bytes_after_prefill"]
