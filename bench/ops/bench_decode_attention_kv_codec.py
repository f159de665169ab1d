"""Decode attention over host KV on the CPU: plain bf16 K, V against the same K, V held compressed
(decode_attention_kv_codec, each tile decoded where the plain kernel reads the cache), with eager
PyTorch's SDPA over the plain K, V in the same run.

    python -m bench.ops.bench_decode_attention_kv_codec --out bench/results/decode_attention_kv_codec_cpu.jsonl \
        --md bench/results/decode_attention_kv_codec_cpu.md

One layer of the Llama-3.1-8B shape (32 query heads, 8 KV heads, head dim 128, bf16), batch 1, T new
tokens over S cached positions; K, V real-looking (normal, a loud channel, 0.2% outliers; the table
calibrated on the first 256 positions). Rows: ms (median), the bytes of K, V each reads (raw or
compressed) and that over the time. Every case is checked first: the compressed attention equals the
plain one bit for bit. What it shows: what the fused decode costs where host memory, not the CPU's
arithmetic, would be the limit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import markdown_table, median_ms, write_rows
from bench.ops.bench_kv_codec import real_looking
from chunkinfer import ops

HQ, HKV, D = 32, 8, 128


def case(s: int, t: int, split_keys: int) -> list[dict]:
    k, v = real_looking((1, HKV, s, D), torch.bfloat16, "cpu", 1), real_looking((1, HKV, s, D), torch.bfloat16, "cpu", 2)
    cal = [ops.kv_calibrate(x[:, :, :256]) for x in (k, v)]
    ek, ev = (ops.kv_encode(x, c.table, escape_capacity=c.escape_capacity) for x, c in zip((k, v), cal))
    q = torch.randn(1, HQ, t, D).to(torch.bfloat16)
    lens = torch.tensor([s], dtype=torch.int32)
    plain = ops.decode_attention(q, k, v, lens, split_keys=split_keys)
    packed = ops.decode_attention_kv_codec(q, ek, ev, lens, split_keys=split_keys)
    if not (torch.equal(plain[0], packed[0]) and torch.equal(plain[1], packed[1])):
        raise SystemExit(f"S={s} T={t}: the compressed attention differs from the plain one")
    raw = 2 * k.numel() * k.element_size()
    stored = ek.stats().stored_bytes + ev.stats().stored_bytes
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    runs = [("chunkinfer decode_attention (raw bf16)", raw, lambda: ops.decode_attention(q, k, v, lens, split_keys=split_keys)),
            ("chunkinfer decode_attention_kv_codec", stored,
             lambda: ops.decode_attention_kv_codec(q, ek, ev, lens, split_keys=split_keys)),
            ("eager SDPA (raw bf16, GQA)", raw,
             lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))]
    rows = []
    for name, nbytes, fn in runs:
        ms = median_ms(fn, device="cpu", warmup=2, reps=7)
        rows.append(dict(what=name, device="cpu", threads=torch.get_num_threads(), cached=s, new_tokens=t,
                         split_keys=split_keys, kv_mib=nbytes / 2**20, ratio=raw / nbytes, ms=ms,
                         gbs=nbytes / ms / 1e6))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    p.add_argument("--split-keys", type=int, default=4096, help="as the loop's exact steps use (0: by threads)")
    p.add_argument("--out", default="bench/results/decode_attention_kv_codec_cpu.jsonl")
    p.add_argument("--md", default=None)
    args = p.parse_args()
    command = "python -m bench.ops.bench_decode_attention_kv_codec " + " ".join(sys.argv[1:])
    rows = [r for s in args.lengths for t in args.tokens for r in case(s, t, args.split_keys)]
    write_rows(args.out, rows, command)
    table = markdown_table(rows, ["what", "cached", "new_tokens", "kv_mib", "ratio", "ms", "gbs"])
    print(table)
    if args.md:
        Path(args.md).write_text(f"Command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
