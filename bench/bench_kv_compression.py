"""Lossless KV compression through the cache, on real models and real text: per host layer, the ratio
the encoded K, V reach (kv_codec_report), and whether the outputs equal the uncompressed offload's.

Each model runs twice with every full-attention layer's KV on the host (convert(kv_offload=True,
resident_layers=0)): raw, and with kv_compression="lossless". The prompt is Python's documentation
(pydoc_data topics), then greedy steps. "8B-shape" is the Llama-3.1-8B shape with random weights (the
capacity run's model; ``--layers`` of them, random token ids): the ratio its K, V reach. Rows: one per (model, host layer), and one summary per model
(host bytes raw and encoded, logits equal, times). Times on the CPU are informational.

  python bench/bench_kv_compression.py --tokens 2048 --steps 8 --out bench/results/kv_compression_cpu
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chunkinfer  # noqa: E402
from bench.common import markdown_table, write_rows  # noqa: E402
from bench.kv_codec_study import load, pydoc_text  # noqa: E402


@torch.inference_mode()
def run(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], object, float, float]:
    """(prompt logits, step logits, cache, prefill seconds, seconds per step)."""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill = time.perf_counter() - t0
    cache, tok, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    t0 = time.perf_counter()
    for _ in range(steps):
        step = model(tok, past_key_values=cache, use_cache=True)
        logits.append(step.logits)
        tok = step.logits.argmax(-1)
    return out.logits, logits, cache, prefill, (time.perf_counter() - t0) / max(steps, 1)


def bench_model(name: str, tokens: int, steps: int, device: str, layers: int) -> list[dict]:
    if name == "8B-shape":
        from chunkinfer.tools.benchmark import build_model, llama31_8b_config

        torch.manual_seed(0)
        base = build_model(llama31_8b_config(layers, llama3_rope=False), device, torch.bfloat16)
        ids = torch.randint(0, base.config.vocab_size, (1, tokens), device=device)
    else:
        tok, base = load(name, torch.bfloat16)
        base = base.to(device)
        ids = torch.tensor([tok(pydoc_text())["input_ids"][:tokens]], device=device)
    kw = dict(chunk_size=512, kv_offload=True, resident_layers=0, cpu_attention=False)
    raw = chunkinfer.convert(copy.deepcopy(base), **kw)
    enc = chunkinfer.convert(base, kv_compression="lossless", **kw)
    r_logits, r_steps, r_cache, r_prefill, r_step = run(raw, ids, steps)
    e_logits, e_steps, e_cache, e_prefill, e_step = run(enc, ids, steps)
    equal = torch.equal(r_logits, e_logits) and all(torch.equal(a, b) for a, b in zip(r_steps, e_steps))
    rows = []
    for rep in e_cache.kv_codec_report():
        rows.append(dict(kind="layer", model=name, layer=rep.layer, k_ratio=rep.k.ratio, v_ratio=rep.v.ratio,
                         ratio=rep.ratio, k_escape_rate=rep.k.escapes / (rep.k.raw_bytes / 2),
                         v_escape_rate=rep.v.escapes / (rep.v.raw_bytes / 2), k_spilled_blocks=rep.k.spilled_blocks,
                         v_spilled_blocks=rep.v.spilled_blocks, blocks=rep.k.blocks + rep.v.blocks))
    ratios = [r["ratio"] for r in rows]
    raw_bytes, enc_bytes = r_cache.host_kv_bytes(), e_cache.host_kv_bytes()
    rows.append(dict(kind="model", model=name, device=device, tokens=ids.shape[1] + steps, host_layers=len(rows),
                     ratio_mean=sum(ratios) / len(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                     host_bytes_raw=raw_bytes, host_bytes_encoded=enc_bytes, host_ratio_held=raw_bytes / enc_bytes,
                     logits_equal=equal, prefill_s_raw=r_prefill, prefill_s_encoded=e_prefill,
                     step_ms_raw=1e3 * r_step, step_ms_encoded=1e3 * e_step))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["SmolLM2-135M", "Gemma-3-270M"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="layers of the 8B-shape model")
    ap.add_argument("--out", default="bench/results/kv_compression_cpu")
    args = ap.parse_args()
    rows = [r for name in args.models for r in bench_model(name, args.tokens, args.steps, args.device, args.layers)]
    command = "python " + " ".join(sys.argv)
    write_rows(args.out + ".jsonl", rows, command)
    models = [r for r in rows if r["kind"] == "model"]
    layers = [r for r in rows if r["kind"] == "layer"]
    text = [markdown_table(models, ["model", "device", "tokens", "host_layers", "ratio_mean", "ratio_min",
                                    "ratio_max", "host_ratio_held", "logits_equal", "prefill_s_raw",
                                    "prefill_s_encoded", "step_ms_raw", "step_ms_encoded"]), "",
            markdown_table(layers, ["model", "layer", "k_ratio", "v_ratio", "ratio", "k_escape_rate",
                                    "v_escape_rate", "k_spilled_blocks", "v_spilled_blocks", "blocks"])]
    print("\n".join(text))
    with open(args.out + ".md", "a") as f:
        f.write(f"\n`{command}`\n\n" + "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
