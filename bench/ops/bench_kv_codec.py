"""GPU throughput of the lossless KV codec (kv_encode / kv_decode) against the device's copy rate.

    python -m bench.ops.bench_kv_codec --out bench/results/kv_codec_h200.jsonl --md bench/results/kv_codec_h200.md

Tensors of several GB shaped like one layer's K of a long Llama-3.1-8B context ([1, 8, S, 128] bf16;
--gib sets the raw size), far beyond the 60 MB L2. Data: real-looking (normal, a loud channel, 0.2%
outliers; its table calibrated on the first 256 positions), and the worst case (uniformly random
words: every block spills). Encode GB/s counts raw input bytes, decode GB/s raw output bytes (the
expanded KV a consumer gets); traffic GB/s adds the compressed bytes (read by decode, written by
encode: what HBM moves) and is compared with a device-to-device copy's read + write rate ("copy").
Each case is checked bit for bit before it is timed. Targets: decode >= 1 TB/s of output; encode
fast enough to hide under a prefill.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.common import copy_bandwidth_gbs, markdown_table, median_ms, write_rows
from chunkinfer import ops

GiB = 1 << 30


def real_looking(shape, dtype, device, seed=0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.7
    x[..., 3] *= 40.0  # a loud channel, as K has
    outliers = torch.rand(shape, generator=g, device=device) < 0.002
    x = torch.where(outliers, x * 100.0, x)
    return x.to(dtype)


def random_words(shape, dtype, device, seed=0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(-(2 ** 15), 2 ** 15, shape, generator=g, device=device, dtype=torch.int32).to(
        torch.int16).view(dtype)


def run_case(name: str, x: torch.Tensor, block_rows: int, copy: float, device: str) -> dict:
    cal = ops.kv_calibrate(x[..., :256, :], block_rows=block_rows)
    lay = cal.layout(x.dtype, x.shape[-1])
    enc = ops.kv_encode(x, cal.table, block_rows=block_rows, escape_capacity=cal.escape_capacity)
    st = enc.stats()
    out = torch.empty_like(x)
    ops.kv_decode(enc.blocks, enc.spill, enc.table, lay, x.shape[-2], out=out)
    if not torch.equal(out.view(torch.int16), x.view(torch.int16)):
        raise SystemExit(f"{name}: decode(encode(x)) differs from x")
    used = torch.zeros(1, dtype=torch.int32, device=x.device)

    def encode():
        used.zero_()  # the pool is reused by every repetition (4 bytes; not counted apart)
        ops.kv_encode_into(enc.blocks, enc.spill, used, x, cal.table, block_rows=block_rows,
                           escape_capacity=cal.escape_capacity)

    def decode():
        ops.kv_decode(enc.blocks, enc.spill, enc.table, lay, x.shape[-2], out=out)

    raw = x.numel() * x.element_size()
    stored = st.stored_bytes
    enc_ms, dec_ms = median_ms(encode, device=device), median_ms(decode, device=device)
    return dict(case=name, device=device, dtype=str(x.dtype).replace("torch.", ""), shape=list(x.shape),
                block_rows=block_rows, escape_capacity=cal.escape_capacity, raw_gib=raw / GiB, ratio=st.ratio,
                spilled_blocks=st.spilled_blocks / st.blocks, encode_ms=enc_ms, decode_ms=dec_ms,
                encode_gbs=raw / enc_ms / 1e6, decode_gbs=raw / dec_ms / 1e6,
                encode_traffic_gbs=(raw + stored) / enc_ms / 1e6, decode_traffic_gbs=(raw + stored) / dec_ms / 1e6,
                decode_of_copy=(raw + stored) / dec_ms / 1e6 / copy,
                encode_of_copy=(raw + stored) / enc_ms / 1e6 / copy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU kernels' rate (use a smaller --gib)")
    p.add_argument("--gib", type=float, default=4.0, help="raw size of each case's tensor")
    p.add_argument("--out", default="bench/results/kv_codec_h200.jsonl")
    p.add_argument("--md", default=None, help="also write the table (with the command) to this markdown file")
    args = p.parse_args()
    command = "python -m bench.ops.bench_kv_codec " + " ".join(sys.argv[1:])
    copy = copy_bandwidth_gbs(args.device, nbytes=min(2 * GiB, int(args.gib * GiB)))
    rows = [dict(case="copy (tensor.copy_, read + write)", device=args.device, decode_traffic_gbs=copy,
                 encode_traffic_gbs=copy)]
    for name, make, dtype, heads, d, block_rows in [
        ("real-looking", real_looking, torch.bfloat16, 8, 128, 16),
        ("real-looking", real_looking, torch.bfloat16, 8, 128, 32),
        ("real-looking, D=64", real_looking, torch.bfloat16, 8, 64, 16),
        ("real-looking", real_looking, torch.float16, 8, 128, 16),
        ("worst case: random words, all spilled", random_words, torch.bfloat16, 8, 128, 16),
    ]:
        positions = int(args.gib * GiB) // (heads * d * 2)
        x = make((1, heads, positions, d), dtype, args.device)
        rows.append(run_case(name, x, block_rows, copy, args.device))
        del x
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_rows(args.out, rows, command)
    cols = ["case", "dtype", "block_rows", "escape_capacity", "raw_gib", "ratio", "spilled_blocks", "encode_gbs",
            "decode_gbs", "encode_traffic_gbs", "decode_traffic_gbs", "encode_of_copy", "decode_of_copy"]
    table = markdown_table(rows, cols)
    print(table)
    if args.md:
        Path(args.md).write_text(f"Command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
