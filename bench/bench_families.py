"""Long-context families on CUDA: stock transformers vs chunkinfer.convert in the same run.

    python -m bench.bench_families --lengths 131072 --out bench/results/families_h200.jsonl

Shapes (random bf16 weights built on the GPU, one model at a time):
  gemma3-12b      48 layers, hidden 3840, 16 heads, 8 KV heads, head dim 256, window 1024 (5 sliding : 1
                  global), vocab 262,208
  qwen3-30b-a3b   48 layers, hidden 2048, 32 heads, 4 KV heads, head dim 128, 128 experts (8 chosen,
                  width 768), vocab 151,936

Per shape and length: prefill seconds and tokens/s, peak memory beyond the weights (allocated and
reserved), the K, V bytes each cache holds after the prefill, decode ms/token at that length, the
bytes a decode step must read (the planner's count: every weight but the embedding table and the
experts no row chose, plus the K, V each layer attends), and whether stock's and chunkinfer's last
logits agree on the next token. Stock rows that run out of memory are recorded as such. Rows are
appended to --out (JSON lines); a markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers as T

import chunkinfer  # the installed package: its compiled kernels, not the source tree
from chunkinfer.planner.rates import decode_bytes
from chunkinfer.planner.shape import Shape
from chunkinfer.tools.benchmark import (build_model, catching_oom, memory_now, prefill, reset_memory, row, timed,
                                        warm_up, weight_bytes)

from .common import markdown_table, write_rows


def gemma3_12b_config(max_positions: int) -> T.PretrainedConfig:
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)]
    return T.Gemma3TextConfig(num_hidden_layers=48, hidden_size=3840, intermediate_size=15360,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                              layer_types=types, vocab_size=262208, query_pre_attn_scalar=256,
                              max_position_embeddings=max_positions)


def qwen3_30b_a3b_config(max_positions: int) -> T.PretrainedConfig:
    return T.Qwen3MoeConfig(num_hidden_layers=48, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768, norm_topk_prob=True, vocab_size=151936,
                            max_position_embeddings=max_positions, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 1e6})


SHAPES = {"gemma3-12b": gemma3_12b_config, "qwen3-30b-a3b": qwen3_30b_a3b_config}


def cache_kv_bytes(cache) -> int:
    """Bytes of the distinct storages behind a cache's K, V tensors (a view keeps its whole base)."""
    seen = {}
    for layer in cache.layers:
        for name in ("k_buf", "v_buf") if hasattr(layer, "k_buf") else ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def decode_ms(model, out, steps: int, warmup: int = 5) -> float:
    """Median ms of one-token greedy steps after the prompt in ``out`` (the cache grows by one a step: stock's
    sliding layers cannot be cropped back once past their window)."""
    cache, nxt, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for i in range(steps + warmup):
        step, sec = timed(lambda: model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1), nxt.device)
        nxt = step.logits[:, -1:].argmax(-1)
        if i >= warmup:
            times.append(sec * 1e3)
    return sorted(times)[len(times) // 2]


def run_shape(name: str, lengths: list[int], args, device="cuda", dtype=torch.bfloat16) -> list[dict]:
    config = SHAPES[name](max(lengths) + 4096)
    model = build_model(config, device, dtype)
    with torch.no_grad():  # random routers would route every token alike; spread them as trained ones do
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.02)
    reset_memory(device)
    base_alloc, base_reserved = memory_now(device)
    shape = Shape.from_config(config)
    elt = torch.empty((), dtype=dtype).element_size()
    rows = [{**row(f"{name} weights", 0, peak_alloc=base_alloc, peak_reserved=base_reserved, device=device),
             "shape": name}]
    warmed: set[str] = set()
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device=device)
        step_bytes = decode_bytes(shape, length, 1, elt)
        next_token = {}
        for impl in ("stock", "chunkinfer"):
            if impl == "stock" and length > args.skip_stock_above:
                continue
            if impl == "chunkinfer" and not chunkinfer.is_converted(model):
                chunkinfer.convert(model, chunk_size=args.chunk_size)
            if impl not in warmed:
                catching_oom(lambda: warm_up(model))
                warmed.add(impl)
            r, out = prefill(model, ids, f"{impl} prefill", base_alloc, base_reserved)
            r |= {"shape": name, "step_bytes_read": step_bytes}
            if out is not None:
                r["kv_bytes_after_prefill"] = cache_kv_bytes(out.past_key_values)
                next_token[impl] = int(out.logits[0, -1].argmax())
                ms, error = catching_oom(lambda: decode_ms(model, out, args.decode_steps))
                r["decode_ms_per_token"], r["decode_error"] = ms, error
            rows.append(r)
            del out
            reset_memory(device)
            print(r, flush=True)
        if len(next_token) == 2:
            rows[-1]["same_next_token_as_stock"] = next_token["stock"] == next_token["chunkinfer"]
        if chunkinfer.is_converted(model):
            chunkinfer.revert(model)
        del ids
    rows[0]["weight_bytes"] = weight_bytes(model)
    del model
    reset_memory(device)
    return rows


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[131072])
    p.add_argument("--skip-stock-above", type=int, default=131072)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=None, help="default: the planner's schedule")
    p.add_argument("--out", type=Path, default=Path("bench/results/families_h200.jsonl"))
    args = p.parse_args()
    assert chunkinfer.build_info()["cuda_kernels"], f"chunkinfer has no CUDA kernels: {chunkinfer.build_info()}"
    rows = []
    for name in args.shapes:
        rows += run_shape(name, args.lengths, args)
    write_rows(args.out, rows, "python -m bench.bench_families " + " ".join(sys.argv[1:]))
    gib = float(1 << 30)
    for r in rows:
        for key in ("peak_alloc_beyond_weights", "peak_reserved_beyond_weights", "kv_bytes_after_prefill",
                    "step_bytes_read"):
            if r.get(key) is not None:
                r[key + " GiB"] = r[key] / gib
    print(markdown_table(rows, ["shape", "what", "length", "seconds", "tokens_per_s", "peak_alloc_beyond_weights GiB",
                                "peak_reserved_beyond_weights GiB", "kv_bytes_after_prefill GiB",
                                "decode_ms_per_token", "step_bytes_read GiB", "same_next_token_as_stock", "error"]))


if __name__ == "__main__":
    main()
