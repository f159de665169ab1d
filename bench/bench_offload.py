"""KV offload on the Llama-3.1-8B shape (bf16, batch 1): prefill with every layer's KV streamed to the
host vs all resident, decode with host KV, and stock transformers' offloaded cache, in one process.

    python -m bench.bench_offload --lengths 262144 --out bench/results/offload_h200.jsonl

Each row carries the planner's prediction next to the measurement (peak beyond weights, seconds,
decode ms/token). Run from bench/ so bench_model imports (the measurement helpers are chunkinfer.tools.benchmark).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

import chunkinfer
from bench.bench_model import build_model
from chunkinfer.tools.benchmark import decode_ms, prefill, reset_memory, row
from bench.common import write_rows

GiB = 1 << 30


def _plan(model, length: int, resident: int | None) -> dict:
    p = chunkinfer.plan(model.config, length, device_memory=torch.cuda.mem_get_info()[1], host_memory="120GiB",
                        chunk_size=8192, resident_layers=resident, decode_tokens=1)
    return {"pred_peak_alloc_beyond_weights": p.peak_alloc_beyond_weights, "pred_seconds": p.prefill_seconds,
            "pred_ms_per_token": p.decode_ms_per_token, "pred_resident_layers": len(p.resident_layers)}


def _huge_pages() -> dict:
    """The host's transparent-huge-page setting and how much of this process is backed by huge pages:
    pinning 4 KiB pages costs the driver 512 times the mappings of 2 MiB ones."""
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None
    rollup = read("/proc/self/smaps_rollup") or ""
    anon_huge = next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("AnonHugePages:")), None)
    thp = read("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"thp_enabled": thp and thp.strip(), "anon_huge_pages_bytes": anon_huge}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[262144])
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--skip-stock-above", type=int, default=262144)
    ap.add_argument("--out", type=Path, default=Path("bench/results/offload_h200.jsonl"))
    args = ap.parse_args()
    command = "python -m bench.bench_offload " + " ".join(sys.argv[1:])

    model = build_model(32, llama3_rope=False)
    reset_memory()
    base = torch.cuda.memory_allocated()
    rows = []
    warm = torch.randint(0, model.config.vocab_size, (1, 4096), device="cuda")
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
        if length <= args.skip_stock_above:  # stock's offloaded cache: every layer's KV moved to the host
            model(warm, use_cache=True, logits_to_keep=1, past_key_values=DynamicCache(config=model.config, offloading=True))
            r, out = prefill(model, ids, "stock offloaded prefill", base, base,
                             past_key_values=DynamicCache(config=model.config, offloading=True))
            rows.append(r)
            print(json.dumps(r), flush=True)
            del out
            reset_memory()
            # PyTorch keeps the offloaded cache's pinned blocks (~30 GiB) cached; give them back
            getattr(torch._C, "_host_emptyCache", lambda: None)()
        for label, kw in [("chunkinfer resident prefill", dict()),
                          ("chunkinfer all-streamed prefill", dict(kv_offload=True, resident_layers=0))]:
            chunkinfer.convert(model, chunk_size=8192, **kw)
            model(warm, use_cache=True, logits_to_keep=1)
            r, out = prefill(model, ids, label, base, base)
            r.update(_plan(model, length, kw.get("resident_layers")))
            streamed = out is not None and "streamed" in label
            if streamed:
                arena = model._chunkinfer.host.arena
                r["host_pinned_bytes"] = arena.bytes_reserved
                r["pinning_seconds"] = dict(zip(("fault_in", "register"), arena.pinning_seconds))
                r.update(_huge_pages())
            print(json.dumps(r), flush=True)  # before the slower runs below, should they not finish
            if streamed:
                # again with the arena's slabs already pinned (the first call pinned them during the prefill)
                cache = out.past_key_values
                del out, cache
                r2, out = prefill(model, ids, label + " (arena warm)", base, base)
                rows.append(r2)
                print(json.dumps(r2), flush=True)
                d = row("chunkinfer all-streamed decode", length, ms_per_token=decode_ms(model, out, args.decode_steps, warmup=2))
                d["pred_ms_per_token"] = r["pred_ms_per_token"]
                d["cpu_attention"] = "auto"  # convert()'s default: part of the host KV attended on the CPU
                d["pcie_only_floor_ms"] = 32 * length * 8 * 128 * 2 * 2 / 55.4e9 * 1e3
                rows += [r, d]
            else:
                rows.append(r)
            print(json.dumps(rows[-1]), flush=True)
            del out
            reset_memory()
            chunkinfer.revert(model)
        res = next(r for r in rows if r["what"] == "chunkinfer resident prefill" and r["length"] == length)
        st = next(r for r in rows if r["what"] == "chunkinfer all-streamed prefill" and r["length"] == length)
        if res["seconds"] and st["seconds"]:
            st["tokens_per_s_vs_resident"] = res["seconds"] / st["seconds"]
    write_rows(args.out, rows, command)
    print("\n| what | length | s | tok/s | vs resident | ms/token | peak alloc GiB (pred) | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, s: "" if v is None else s.format(v)  # noqa: E731
        peak = r.get("peak_alloc_beyond_weights")
        pred = r.get("pred_peak_alloc_beyond_weights")
        print(f"| {r['what']} | {r['length']} | {f(r['seconds'], '{:.1f}')} | {f(r['tokens_per_s'], '{:.0f}')} | "
              f"{f(r.get('tokens_per_s_vs_resident'), '{:.3f}')} | {f(r['ms_per_token'], '{:.1f}')} | "
              f"{f(peak and peak / GiB, '{:.2f}')} ({f(pred and pred / GiB, '{:.2f}')}) | {r['error'] or ''} |")


if __name__ == "__main__":
    main()
