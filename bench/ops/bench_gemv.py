"""The decode step's projections: chunkinfer's gemv ops against cuBLAS (F.linear) + the elementwise ops.

    python -m bench.ops.bench_gemv --out bench/results/gemv_h200.jsonl

Llama-3.1-8B's 32 layers of distinct random bf16 weights (13.3 GB, far beyond the 60 MB L2), so every
weight byte comes from HBM as in a real step. Each case runs the projection over all 32 layers,
captured in one CUDA graph (as the decode step is), and the replay is timed; GB/s counts weight bytes
read once. "copy" is a device-to-device copy's bytes read + written per second, the ceiling of the
other benches; a weight stream only reads.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbs, markdown_table, median_ms, write_rows
from chunkinfer import ops

H, I, NQ, NKV, LAYERS = 4096, 14336, 4096, 1024, 32


def layer_weights(device, dtype) -> list[dict]:
    def w(m, k):
        return torch.randn(m, k, device=device, dtype=dtype) * k ** -0.5

    return [dict(q=w(NQ, H), k=w(NKV, H), v=w(NKV, H), o=w(H, NQ), gate=w(I, H), up=w(I, H), down=w(H, I))
            for _ in range(LAYERS)]


def cases(layers: list[dict], rows: int, device, dtype) -> dict:
    x = torch.randn(rows, H, device=device, dtype=dtype)
    a = torch.randn(rows, NQ, device=device, dtype=dtype)
    m = torch.randn(rows, I, device=device, dtype=dtype) * 0.1

    res, add, spare = (torch.randn(rows, H, device=device, dtype=dtype) for _ in range(3))
    nw = torch.rand(H, device=device, dtype=dtype) + 0.5

    h = add.clone()

    def norm_then(project):  # the unfused decode step: residual add + norm in place, then the projection
        def run(lw):
            ops.fused_add_rms_norm(h, res, nw, 1e-5)  # (values drift over replays; the times do not)
            return project(h, lw)
        return run

    prologue = ops.NormPrologue(nw, 1e-5, add=add, residual_out=spare)

    def every_layer(fn):
        return lambda: [fn(lw) for lw in layers]

    def act_unfused(lw):
        return ops.silu_and_mul(F.linear(x, lw["gate"]), F.linear(x, lw["up"]))

    return {
        ("q|k|v", "cuBLAS x3"): (every_layer(lambda lw: (F.linear(x, lw["q"]), F.linear(x, lw["k"]), F.linear(x, lw["v"]))),
                                 ("q", "k", "v")),
        ("q|k|v", "chunkinfer.gemv"): (every_layer(lambda lw: ops.gemv(x, [lw["q"], lw["k"], lw["v"]])), ("q", "k", "v")),
        ("o_proj", "cuBLAS"): (every_layer(lambda lw: F.linear(a, lw["o"])), ("o",)),
        ("o_proj", "chunkinfer.gemv"): (every_layer(lambda lw: ops.gemv(a, [lw["o"]])), ("o",)),
        ("silu(gate)*up", "cuBLAS x2 + silu_and_mul"): (every_layer(act_unfused), ("gate", "up")),
        ("silu(gate)*up", "chunkinfer.gemv_act_and_mul"): (every_layer(lambda lw: ops.gemv_act_and_mul(x, lw["gate"], lw["up"])),
                                                           ("gate", "up")),
        ("add+norm, q|k|v", "fused_add_rms_norm + gemv"): (
            every_layer(norm_then(lambda h, lw: ops.gemv(h, [lw["q"], lw["k"], lw["v"]]))), ("q", "k", "v")),
        ("add+norm, q|k|v", "gemv with the norm prologue"): (
            every_layer(lambda lw: ops.gemv(res, [lw["q"], lw["k"], lw["v"]], norm=prologue)), ("q", "k", "v")),
        ("add+norm, silu(gate)*up", "fused_add_rms_norm + gemv_act_and_mul"): (
            every_layer(norm_then(lambda h, lw: ops.gemv_act_and_mul(h, lw["gate"], lw["up"]))), ("gate", "up")),
        ("add+norm, silu(gate)*up", "gemv_act_and_mul with the norm prologue"): (
            every_layer(lambda lw: ops.gemv_act_and_mul(res, lw["gate"], lw["up"], norm=prologue)), ("gate", "up")),
        ("down_proj", "cuBLAS"): (every_layer(lambda lw: F.linear(m, lw["down"])), ("down",)),
        ("down_proj", "chunkinfer.gemv"): (every_layer(lambda lw: ops.gemv(m, [lw["down"]])), ("down",)),
    }


def graph_ms(fn, device) -> float:
    fn()  # allocator pools and cuBLAS handles before the capture
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return median_ms(g.replay, device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--out", default="bench/results/gemv_h200.jsonl")
    args = p.parse_args()
    dtype = torch.bfloat16
    copy = copy_bandwidth_gbs(args.device)
    layers = layer_weights(args.device, dtype)
    out = [dict(op="copy", impl="tensor.copy_ (read + write)", rows=0, ms=float("nan"), gbs=copy)]
    for rows in args.rows:
        for (op, impl), (fn, names) in cases(layers, rows, args.device, dtype).items():
            ms = graph_ms(fn, args.device)
            nbytes = sum(lw[n].numel() * lw[n].element_size() for lw in layers for n in names)
            out.append(dict(op=op, impl=impl, rows=rows, ms=ms, gbs=nbytes / ms / 1e6))
    for row in out:
        row.update(dtype="bfloat16", device=args.device, layers=LAYERS, of_copy=row["gbs"] / copy)
    write_rows(args.out, out, "python -m bench.ops.bench_gemv " + " ".join(sys.argv[1:]))
    print(markdown_table(out, ["op", "impl", "rows", "ms", "gbs", "of_copy"]))


if __name__ == "__main__":
    main()
