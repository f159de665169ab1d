"""Where a converted model's decode step spends its time: the whole model() call, the captured graph's
replay alone (GPU time and wall time), and the eager step's kernels by name (torch.profiler).

    python -m bench.profile_decode --lengths 32768 131072 --out bench/results/profile_decode_h200.jsonl

Llama-3.1-8B shape, random bf16 weights, batch 1. The call minus the replay is host work around the
graph (input checks, positions, cache bookkeeping, the logits copy); the replay minus the kernels' sum
is launch gaps inside the graph.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

import chunkinfer
from chunkinfer.tools import benchmark
from chunkinfer.tools.benchmark import decode_ms, llama31_8b_config
from chunkinfer.loop.step import step_logits

from bench.common import markdown_table, write_rows


def replay_times(graph: torch.cuda.CUDAGraph, reps: int = 30) -> tuple[float, float]:
    """Median GPU ms (events) and wall ms (host until the GPU is done) of one replay."""
    gpu, wall = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(wall)


def kernel_table(mb, cache, cap, steps: int = 5) -> list[dict]:
    """The eager step's CUDA kernels: total ms per step and count per step, by kernel name."""
    def run():
        step_logits(mb, cache, cap.ids, None, cap.positions, cap.step, cap.logits.shape[1])
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        r = rows.setdefault(ev.name[:90], dict(kernel=ev.name[:90], ms=0.0, count=0))
        r["ms"] += ev.device_time / 1e3 / steps
        r["count"] += 1 / steps
    return sorted(rows.values(), key=lambda r: -r["ms"])


def host_profile(model, out, steps: int = 20) -> str:
    """cProfile of whole decode calls (the graph replays inside): where the host's time goes."""
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prof.disable()
        cache.crop(-1)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--out", default="bench/results/profile_decode_h200.jsonl")
    args = p.parse_args()
    model = benchmark.build_model(llama31_8b_config(32, True, max_positions=max(args.lengths) + 64), "cuda",
                                  torch.bfloat16)
    chunkinfer.convert(model)
    state, rows = model._chunkinfer, []
    for n in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        out = model(ids, use_cache=True, logits_to_keep=1)
        call = decode_ms(model, out, steps=20)
        cap = state.graphs.captured(1, 1, 1)
        gpu, wall = replay_times(cap.graph)
        kernels = kernel_table(state.binding, out.past_key_values, cap)
        total = sum(k["ms"] for k in kernels)
        rows.append(dict(what="decode step", length=n, call_ms=call, replay_gpu_ms=gpu, replay_wall_ms=wall,
                         eager_kernel_sum_ms=total, kernels_per_step=round(sum(k["count"] for k in kernels))))
        print(markdown_table(rows[-1:], list(rows[-1])))
        top = [dict(length=n, **k) for k in kernels[:14]]
        print(markdown_table(top, ["kernel", "ms", "count"]))
        rows += [dict(what="kernel", **k) for k in top]
        if n == args.lengths[0]:
            print(host_profile(model, out))
        del out
        torch.cuda.empty_cache()
    write_rows(args.out, rows, "python -m bench.profile_decode " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
