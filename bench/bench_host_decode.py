"""Decode with every layer's KV on the host: PCIe-only streaming vs the CPU attending part of it.

Llama-3.1-8B shape, bf16, batch 1. One all-streamed prefill per length, then one-token decode steps on
that cache with the CPU's share of each host layer fixed at several values and "auto" (balanced from
the measured CPU rate), next to the PCIe-only floor (host KV bytes / 55.4 GB/s).

    python -m bench.bench_host_decode --lengths 32768 131072 262144 --out bench/results/host_decode_h200.jsonl

``--kv-compression``: the host KV encoded (convert(kv_compression="lossless")): the rows then carry the
measured ratio, and the prefill row times the encoding too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import chunkinfer
from bench.bench_model import build_model, decode_ms, prefill, reset_memory, row
from chunkinfer.kv.host_attention import H2D_BYTES_PER_S, CpuShare
from bench.common import write_rows


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144])
    ap.add_argument("--shares", default="0,0.3,0.4,0.5,0.6,auto", help="CPU shares to time; 0 = PCIe only")
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/host_decode_h200.jsonl"))
    ap.add_argument("--kv-compression", action="store_true", help="host KV kept losslessly encoded")
    args = ap.parse_args()
    command = "python -m bench.bench_host_decode " + " ".join(sys.argv[1:])
    print(f"torch threads: {torch.get_num_threads()}", flush=True)

    model = build_model(32, llama3_rope=False)
    chunkinfer.convert(model, chunk_size=8192, kv_offload=True, resident_layers=0, cpu_attention=False,
                       kv_compression="lossless" if args.kv_compression else None)
    tag = " (host KV encoded)" if args.kv_compression else ""
    host = model._chunkinfer.host
    reset_memory()
    base = torch.cuda.memory_allocated()
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
        host.cpu_share = None
        r, out = prefill(model, ids, "chunkinfer all-streamed prefill" + tag, base, base)
        if args.kv_compression:
            reports = out.past_key_values.kv_codec_report()
            r["kv_ratio"] = (sum(x.k.raw_bytes + x.v.raw_bytes for x in reports)
                             / sum(x.k.stored_bytes + x.v.stored_bytes for x in reports))
        rows.append(r)
        print(json.dumps(r), flush=True)
        kv_bytes = 32 * length * 8 * 128 * 2 * 2
        floor = kv_bytes / H2D_BYTES_PER_S * 1e3
        for share in args.shares.split(","):
            host.cpu_share = None if share == "0" else CpuShare() if share == "auto" else CpuShare(fixed=float(share))
            ms = decode_ms(model, out, args.decode_steps, warmup=3)
            d = row(f"decode, CPU share {share}" + tag, length, ms_per_token=ms)
            d["pcie_only_floor_ms"] = floor
            d["vs_floor"] = ms / floor
            if host.cpu_share is not None:
                d["cpu_share_used"] = host.cpu_share.share()
                d["cpu_attention_gb_per_s"] = host.cpu_share.cpu_bytes_per_s / 1e9
            rows.append(d)
            print(json.dumps(d), flush=True)
        del out
        reset_memory()
    write_rows(args.out, rows, command)
    print("\n| length | what | ms/token | vs PCIe-only floor | CPU share | CPU GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["ms_per_token"] is None:
            continue
        f = lambda v, s: "" if v is None else s.format(v)  # noqa: E731
        print(f"| {r['length']} | {r['what']} | {r['ms_per_token']:.1f} | {f(r.get('vs_floor'), '{:.2f}')} | "
              f"{f(r.get('cpu_share_used'), '{:.2f}')} | {f(r.get('cpu_attention_gb_per_s'), '{:.1f}')} |")


if __name__ == "__main__":
    main()
