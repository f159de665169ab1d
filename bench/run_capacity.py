"""The capacity run: one very long prefill of the Llama-3.1-8B shape (bf16, batch 1) with KV offload,
then decode tokens, each of the first ones checked against an fp32 recomputation over the same stored KV.

Long (a 1.5M-token prefill takes about 20 minutes), so it is meant to run in the background:

    setsid python -m bench.run_capacity --length 1572864 --progress /tmp/cap.log \
        --out bench/results/capacity_h200.jsonl > /tmp/cap.out 2>&1 &

Progress lines (chunks done / in all, seconds, device memory) go to --progress as the prefill runs;
the result row is appended to --out and printed. The planner's prediction is recorded next to it.

``--kv-compression``: streamed layers keep their K, V losslessly encoded (convert(kv_compression=...)),
with the planner's margin ``--margin`` on the ratio measured on layer 0 of the prompt; the row then has
the measured ratio, the planned one, the per-layer ratios and the encoded bytes on host and device:

    setsid python -m bench.run_capacity --length 2097152 --kv-compression --margin 0.03 --chunk-size 0 \
        --progress /tmp/cap.log --out bench/results/capacity_h200.jsonl > /tmp/cap.out 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

import chunkinfer
from bench.bench_model import build_model, reset_memory
from chunkinfer.forward import planned_kv_ratio
from chunkinfer.kv.encoded import KVCompression
from chunkinfer.kv.offload import EncodedKVLayer
from chunkinfer.tools.verify import reference_step_logits
from bench.common import write_rows

GiB = 1 << 30


def _compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.float(), ref.float()
    return {"max_abs_err": (ours - ref).abs().max().item(), "ref_max_abs": ref.abs().max().item(),
            "rel_err": ((ours - ref).norm() / ref.norm()).item(), "top1_equal": bool(ours.argmax() == ref.argmax())}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1_572_864)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--checked-tokens", type=int, default=2, help="decode tokens checked against fp32")
    ap.add_argument("--resident-layers", type=int, default=None, help="default: the planner's placement")
    ap.add_argument("--chunk-size", type=int, default=8192, help="0: the planner's schedule")
    ap.add_argument("--kv-compression", action="store_true", help="streamed layers' K, V encoded losslessly")
    ap.add_argument("--margin", type=float, default=0.1, help="the planner's margin on the measured ratio")
    ap.add_argument("--progress", type=Path, default=Path("/tmp/capacity_progress.log"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/capacity_h200.jsonl"))
    args = ap.parse_args()
    command = "python -m bench.run_capacity " + " ".join(sys.argv[1:])
    log = args.progress.open("a", buffering=1)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        log.write(f"{time.perf_counter() - t0:8.1f}s {msg}\n")

    model = build_model(args.layers, llama3_rope=False)
    reset_memory()
    weights = torch.cuda.memory_allocated()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            say(f"prefill {done}/{total} chunks, allocated {torch.cuda.memory_allocated() / GiB:.1f} GiB")

    chunk = args.chunk_size or None
    compression = KVCompression(margin=args.margin) if args.kv_compression else None
    chunkinfer.convert(model, chunk_size=chunk, kv_offload=True, resident_layers=args.resident_layers,
                       progress=progress, kv_compression=compression)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda")
    # the ratio the converted model's planner will size encoded KV by (layer 0's K, V of the prompt)
    ratio = planned_kv_ratio(model._chunkinfer, ids, None, None, 0) if compression is not None else None
    p = chunkinfer.plan(model.config, args.length, decode_tokens=args.decode_tokens, chunk_size=chunk,
                        resident_layers=args.resident_layers, kv_compression_ratio=ratio)
    say("plan:\n" + p.table())
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - weights
    cache = out.past_key_values
    host = model._chunkinfer.host
    res = {"what": "chunkinfer capacity", "length": args.length, "layers": args.layers, "prefill_seconds": prefill_s,
           "tokens_per_s": args.length / prefill_s, "peak_alloc_beyond_weights": peak,
           "peak_reserved": torch.cuda.max_memory_reserved(), "weights": weights,
           "resident_layers": len(cache.layers) - len(cache.streamed_layers()),
           "host_layers": len(cache.streamed_layers()), "cpu_attention": host.cpu_share is not None,
           "pinned_reserved": host.arena.bytes_reserved,
           "pinned_used": host.arena.bytes_used, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "pred_peak_alloc_beyond_weights": p.peak_alloc_beyond_weights, "pred_prefill_seconds": p.prefill_seconds,
           "pred_ms_per_token": p.decode_ms_per_token, "pred_resident_layers": len(p.resident_layers),
           "chunk_size": chunk, "kv_compression": compression is not None}
    if compression is not None:
        reports = cache.kv_codec_report()
        raw = sum(r.k.raw_bytes + r.v.raw_bytes for r in reports)
        stored = sum(r.k.stored_bytes + r.v.stored_bytes for r in reports)
        res.update({"planned_ratio": ratio, "measured_ratio_all_layers": raw / stored,
                    "layer_ratios": [round(r.ratio, 4) for r in reports],
                    "spilled_blocks": sum(r.k.spilled_blocks + r.v.spilled_blocks for r in reports),
                    "encoded_device_layers": sum(isinstance(layer, EncodedKVLayer) and not layer.cpu_readable
                                                 for layer in cache.layers),
                    "pred_encoded_device_layers": len(p.encoded_device_layers),
                    "host_kv_bytes": cache.host_kv_bytes()})
    say(f"prefill done in {prefill_s:.1f} s: {json.dumps(res)}")
    del ids
    torch.cuda.empty_cache()

    nxt = out.logits[:, -1:].argmax(-1)
    del out
    steps, checks = [], []
    for i in range(args.decode_tokens):
        ref = reference_step_logits(model, cache, nxt) if i < args.checked_tokens else None
        torch.cuda.synchronize()
        t = time.perf_counter()
        step = model(nxt, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        steps.append((time.perf_counter() - t) * 1e3)
        logits = step.logits[0, -1]
        if ref is not None:
            checks.append(_compare(logits, ref))
            say(f"decode {i}: {steps[-1]:.0f} ms, vs fp32 {checks[-1]}")
        else:
            say(f"decode {i}: {steps[-1]:.0f} ms")
        nxt = logits.argmax().view(1, 1)
    res.update({"decode_ms": steps, "decode_ms_median": sorted(steps)[len(steps) // 2], "checks": checks,
                "cached_after": cache.get_seq_length()})
    write_rows(args.out, [res], command)
    say("done: " + json.dumps(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
