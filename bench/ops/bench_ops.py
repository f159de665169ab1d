"""silu_and_mul and fused_add_rms_norm against the eager PyTorch composition and the copy ceiling.

    python -m bench.ops.bench_ops --out bench/results/ops_h200.jsonl

Bandwidth counts bytes read + written once each (the minimum the op must move), like the copy.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbs, markdown_table, median_ms, write_rows
from chunkinfer import ops


def bench_silu_and_mul(rows: int, d: int, dtype, device) -> list[dict]:
    x = torch.randn(rows, 2 * d, dtype=dtype, device=device)
    out = torch.empty(rows, d, dtype=dtype, device=device)
    gate, up = x[:, :d], x[:, d:]
    nbytes = 3 * rows * d * x.element_size()
    shape = f"[{rows}, 2*{d}]"
    cases = {
        "chunkinfer.silu_and_mul": lambda: ops.silu_and_mul(x, out=out),
        "eager F.silu(g) * u": lambda: F.silu(gate) * up,
    }
    return [dict(op="silu_and_mul", impl=k, shape=shape, ms=median_ms(f, device=device), bytes=nbytes)
            for k, f in cases.items()]


def bench_fused_add_rms_norm(rows: int, h: int, dtype, device) -> list[dict]:
    x = torch.randn(rows, h, dtype=dtype, device=device)
    residual = torch.randn(rows, h, dtype=dtype, device=device)
    w = torch.randn(h, dtype=dtype, device=device)
    nbytes = 4 * rows * h * x.element_size()
    shape = f"[{rows}, {h}]"

    def eager():
        residual.add_(x)
        return F.rms_norm(residual, (h,), w, 1e-6)

    cases = {
        "chunkinfer.fused_add_rms_norm": lambda: ops.fused_add_rms_norm(x, residual, w, 1e-6),
        "eager add + F.rms_norm": eager,
    }
    return [dict(op="fused_add_rms_norm", impl=k, shape=shape, ms=median_ms(f, device=device), bytes=nbytes)
            for k, f in cases.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--out", default="bench/results/ops_h200.jsonl")
    args = p.parse_args()
    dtype = torch.bfloat16
    copy = copy_bandwidth_gbs(args.device)
    rows = [dict(op="copy", impl="tensor.copy_", shape="2 GiB", ms=float("nan"), bytes=0, gbs=copy, of_copy=1.0)]
    for row in bench_silu_and_mul(args.rows, 14336, dtype, args.device) + \
            bench_fused_add_rms_norm(args.rows, 4096, dtype, args.device):
        row["gbs"] = row["bytes"] / row["ms"] / 1e6
        row["of_copy"] = row["gbs"] / copy
        rows.append(row)
    for row in rows:
        row.update(dtype="bfloat16", device=args.device)
    write_rows(args.out, rows, "python -m bench.ops.bench_ops " + " ".join(sys.argv[1:]))
    print(markdown_table(rows, ["op", "impl", "shape", "ms", "gbs", "of_copy"]))


if __name__ == "__main__":
    main()
