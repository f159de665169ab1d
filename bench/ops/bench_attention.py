"""Decode attention: chunkinfer's kernels against PyTorch's SDPA, as GB/s of K, V read.

Shape: Hq=32, Hkv=8, D=128, batch 1, one query token (Llama-3.1-8B's attention). Bytes counted:
2 * B * Hkv * L * D * element size (K and V once each).
  CUDA: ours (eager and as a replayed CUDA graph), SDPA with enable_gqa=True, and repeat_kv + SDPA
        (what transformers does), bf16, at each length; against a device-to-device copy measured in
        the same run (bytes read + written). CUDA events, median of --iters calls, each call on a
        different cache when one cache would fit in L2.
  CPU:  ours against SDPA enable_gqa on the host's threads, bf16 and fp32 KV, --cpu-length tokens;
        against the host's read bandwidth (t.sum() over a large tensor).
Rows go to --out as JSON; a markdown table goes to stdout.

  PYTHONPATH=python python -m bench.ops.bench_attention [--device cuda|cpu|all] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chunkinfer import ops

HQ, HKV, D = 32, 8, 128


def kv_bytes(length: int, dtype: torch.dtype, batch: int = 1) -> int:
    return 2 * batch * HKV * length * D * torch.empty((), dtype=dtype).element_size()


def cuda_median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def cpu_median_ms(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(iters: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / (ms * 1e6)


def host_read_gbps(iters: int) -> float:
    big = torch.ones(1 << 30, dtype=torch.float32)  # 4 GiB
    ms = cpu_median_ms(lambda: big.sum(), iters)
    return big.numel() * 4 / (ms * 1e6)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]."""
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def bench_cuda(lengths: list[int], iters: int) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    copy = copy_gbps(iters)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20)
    print(f"device-to-device copy: {copy:.0f} GB/s (read + written)")
    rows.append({"what": "copy_d2d", "device": "cuda", "gbps": copy})
    for length in lengths:
        nbytes = kv_bytes(length, dtype)
        copies = max(1, math.ceil(4 * l2 / nbytes))
        caches = [(torch.randn(1, HKV, length, D, device="cuda", dtype=dtype),
                   torch.randn(1, HKV, length, D, device="cuda", dtype=dtype)) for _ in range(copies)]
        q = torch.randn(1, HQ, 1, D, device="cuda", dtype=dtype)
        seq_lens = torch.tensor([length], dtype=torch.int32, device="cuda")
        turn = [0]

        def rotate():
            turn[0] = (turn[0] + 1) % copies
            return caches[turn[0]]

        def ours():
            k, v = rotate()
            ops.decode_attention(q, k, v, seq_lens)

        def sdpa_gqa():
            k, v = rotate()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        def sdpa_repeat():
            k, v = rotate()
            F.scaled_dot_product_attention(q, repeat_kv(k, HQ // HKV), repeat_kv(v, HQ // HKV))

        # one graph per cache, all writing the same output buffers
        out = torch.empty_like(q)
        lse = torch.empty(1, HQ, 1, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k, v in caches:
                ops.decode_attention(q, k, v, seq_lens, out=out, lse=lse)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for k, v in caches:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                ops.decode_attention(q, k, v, seq_lens, out=out, lse=lse)
            graphs.append(g)

        def ours_graph():
            turn[0] = (turn[0] + 1) % copies
            graphs[turn[0]].replay()

        impls = {"chunkinfer": ours, "chunkinfer_graph": ours_graph, "sdpa_enable_gqa": sdpa_gqa,
                 "repeat_kv_sdpa": sdpa_repeat}
        for name, fn in impls.items():
            if name == "repeat_kv_sdpa" and length > 131072:
                continue  # the repeated copy alone is 4x the cache
            ms = cuda_median_ms(fn, iters)
            gbps = nbytes / (ms * 1e6)
            rows.append({"what": "decode_attention", "impl": name, "device": "cuda", "dtype": "bf16",
                         "length": length, "batch": 1, "hq": HQ, "hkv": HKV, "d": D, "ms": ms,
                         "kv_gbps": gbps, "copy_gbps": copy, "frac_of_copy": gbps / copy, "caches": copies})
        del caches, graphs
        torch.cuda.empty_cache()
    return rows


def bench_cpu(length: int, iters: int) -> list[dict]:
    rows = []
    read = host_read_gbps(iters)
    threads = torch.get_num_threads()
    print(f"host read: {read:.1f} GB/s on {threads} threads")
    rows.append({"what": "host_read", "device": "cpu", "gbps": read, "threads": threads})
    for dtype in (torch.bfloat16, torch.float32):
        k = torch.randn(1, HKV, length, D, dtype=dtype)
        v = torch.randn(1, HKV, length, D, dtype=dtype)
        q = torch.randn(1, HQ, 1, D, dtype=dtype)
        seq_lens = torch.tensor([length], dtype=torch.int32)
        nbytes = kv_bytes(length, dtype)
        impls = {"chunkinfer": lambda: ops.decode_attention(q, k, v, seq_lens),
                 "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        for name, fn in impls.items():
            ms = cpu_median_ms(fn, iters)
            gbps = nbytes / (ms * 1e6)
            rows.append({"what": "decode_attention", "impl": name, "device": "cpu",
                         "dtype": str(dtype).replace("torch.", ""), "length": length, "batch": 1, "hq": HQ,
                         "hkv": HKV, "d": D, "ms": ms, "kv_gbps": gbps, "host_read_gbps": read,
                         "frac_of_host_read": gbps / read, "threads": threads})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| device | impl | dtype | length | ms | GB/s of K,V | of ceiling |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] != "decode_attention":
            continue
        frac = r.get("frac_of_copy", r.get("frac_of_host_read"))
        lines.append(f"| {r['device']} | {r['impl']} | {r['dtype']} | {r['length']} | {r['ms']:.4f} | "
                     f"{r['kv_gbps']:.0f} | {100 * frac:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu", "all"], default="all")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    parser.add_argument("--cpu-length", type=int, default=131072)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--cpu-iters", type=int, default=10)
    parser.add_argument("--out", default="bench/results/attention_h200.json")
    args = parser.parse_args()
    rows: list[dict] = []
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            rows += bench_cuda(args.lengths, args.iters)
        else:
            print("no CUDA device: skipping the CUDA rows")
    if args.device in ("cpu", "all"):
        rows += bench_cpu(args.cpu_length, args.cpu_iters)
    info = ops.build_info()
    meta = {"torch": torch.__version__, "compiled": info["compiled"],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for r in rows:
        r.update(meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
