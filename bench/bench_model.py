"""Llama-3.1-8B-shaped prefill / decode / generate benchmark: stock transformers vs chunkinfer.convert.

    python -m bench.bench_model --lengths 32768 131072 --skip-stock-above 131072 --decode \
        --out bench/results/model_h200.json

Random bf16 weights built on the GPU. Rows are appended to --out (JSON lines); a markdown table goes
to stdout. Peak memory is reported beyond the weights (allocated and reserved).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import chunkinfer  # the installed package: its compiled kernels, not the source tree
from chunkinfer.tools import benchmark
from chunkinfer.tools.benchmark import decode_ms, llama31_8b_config, prefill, reset_memory, row, timed, warm_up

__all__ = ["build_model", "decode_ms", "prefill", "reset_memory", "row", "timed", "warm_up", "generate_row"]


def build_model(layers: int, llama3_rope: bool):
    """The Llama-3.1-8B shape with ``layers`` layers: random bf16 weights on the GPU."""
    return benchmark.build_model(llama31_8b_config(layers, llama3_rope, max_positions=262144), "cuda", torch.bfloat16)


def generate_row(model, ids, label, new_tokens: int) -> dict:
    """generate()'s decode rate: (time for new_tokens - time for 1) / (new_tokens - 1), so the prefill
    and generate()'s set-up cancel out."""
    def run(n):
        return timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False))[1]

    reset_memory()
    try:
        decode_s = run(new_tokens) - run(1)
    except torch.OutOfMemoryError as exc:
        reset_memory()
        return row(label, ids.shape[1], error=f"OOM: {str(exc).splitlines()[0]}")
    return row(label, ids.shape[1], decode_s, tokens=new_tokens - 1, ms_per_token=decode_s / (new_tokens - 1) * 1e3)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--skip-stock-above", type=int, default=131072)
    p.add_argument("--decode", action="store_true", help="also time decode steps and generate()")
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--generate-tokens", type=int, default=32)
    p.add_argument("--generate-lengths", type=int, nargs="*", default=None,
                   help="lengths at which to time generate() (default: all, when --decode)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--prefill-reps", type=int, default=1, help="prefills per length (median reported)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--llama3-rope", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results/model_h200.json"))
    args = p.parse_args()

    assert chunkinfer.build_info()["cuda_kernels"], f"chunkinfer has no CUDA kernels: {chunkinfer.build_info()}"
    model = build_model(args.layers, args.llama3_rope)
    reset_memory()
    base_alloc, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    command = "python -m bench.bench_model " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [row("weights", 0, peak_alloc=base_alloc, peak_reserved=base_reserved)]
    warmed: set[str] = set()
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
        for impl in ("stock", "chunkinfer"):
            if impl == "stock" and length > args.skip_stock_above:
                continue
            if impl == "chunkinfer" and not chunkinfer.is_converted(model):
                chunkinfer.convert(model, chunk_size=args.chunk_size)
            if impl == "stock" and chunkinfer.is_converted(model):
                chunkinfer.revert(model)
            if impl not in warmed:
                warm_up(model)
                warmed.add(impl)
            r, out = prefill(model, ids, f"{impl} prefill", base_alloc, base_reserved, args.prefill_reps)
            rows.append(r)
            if args.decode and out is not None:
                ms = decode_ms(model, out, args.decode_steps)
                rows.append(row(f"{impl} decode", length, ms_per_token=ms))
            del out
            reset_memory()
            gen_here = args.generate_lengths is None or length in args.generate_lengths
            if args.decode and gen_here and r["seconds"] is not None:
                rows.append(generate_row(model, ids, f"{impl} generate {args.generate_tokens}", args.generate_tokens))
            reset_memory()
            print(json.dumps(rows[-1]), flush=True)
        del ids
    with args.out.open("a") as f:  # one line per row, each with the command that produced it
        for r in rows:
            f.write(json.dumps({**r, "command": command}) + "\n")
    gib = 1 << 30
    print("\n| what | length | s | tok/s | ms/token | peak alloc GiB | peak reserved GiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: "" if v is None else f.format(v)  # noqa: E731
        print(f"| {r['what']} | {r['length']} | {fmt(r['seconds'], '{:.2f}')} | {fmt(r['tokens_per_s'], '{:.0f}')} | "
              f"{fmt(r['ms_per_token'], '{:.2f}')} | {fmt(r['peak_alloc_beyond_weights'] and r['peak_alloc_beyond_weights'] / gib, '{:.2f}')} | "
              f"{fmt(r['peak_reserved_beyond_weights'] and r['peak_reserved_beyond_weights'] / gib, '{:.2f}')} | {r['error'] or ''} |")
    kv = 2 * args.layers * 8 * 128 * 2
    print(f"\nprediction for chunkinfer peak beyond weights: KV {kv // 1024} KiB/token + residual 8 KiB/token + < 3 GiB")


if __name__ == "__main__":
    main()
