"""Where a converted model's decode call spends its host time, split at the graph replay, and where
a replayed step's GPU time goes kernel by kernel (torch.profiler over one replay).

    python -m bench.decode_host_time --length 32768

Llama-3.1-8B shape, random bf16 weights, batch 1. Only the host work before the replay adds to a
call's latency; what follows it (logits copy, output object) overlaps the GPU's work. Prints one JSON
line (microseconds, ms) and the replay's kernel timeline (start, duration, gap to the previous end:
negative where programmatic launches overlap).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import chunkinfer
from chunkinfer.tools import benchmark
from chunkinfer.tools.benchmark import decode_ms, llama31_8b_config


def host_us(fn, reps: int = 2000) -> float:
    """Host microseconds per call of fn (enqueue only; the GPU is synchronised before and after)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    return dt


def call_split(model, cache, nxt, steps: int = 50) -> dict:
    """Median host us before the replay, in it, after it, and the synchronised call's ms."""
    marks, replay = {}, torch.cuda.CUDAGraph.replay

    def marked(self):
        marks["r0"] = time.perf_counter()
        replay(self)
        marks["r1"] = time.perf_counter()
    torch.cuda.CUDAGraph.replay = marked
    try:
        pre, rep, post, call = [], [], [], []
        for i in range(steps + 10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            cache.crop(-1)
            if i >= 10:
                pre.append((marks["r0"] - t0) * 1e6)
                rep.append((marks["r1"] - marks["r0"]) * 1e6)
                post.append((t1 - marks["r1"]) * 1e6)
                call.append((t2 - t0) * 1e3)
    finally:
        torch.cuda.CUDAGraph.replay = replay
    med = statistics.median
    return dict(pre_replay_us=med(pre), replay_call_us=med(rep), post_replay_us=med(post), call_ms=med(call))


def timeline(graph: torch.cuda.CUDAGraph, show_layers: tuple[int, int] = (5, 7)) -> None:
    """The kernels of one replay (the middle of three) in order, and their sums by name."""
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    per = len(ev) // 3
    ev = ev[per:2 * per]
    t0, prev_end = ev[0].time_range.start, None
    sums = collections.defaultdict(lambda: [0.0, 0, 0.0])
    lo, hi = 16 + 7 * show_layers[0], 16 + 7 * show_layers[1]
    for i, e in enumerate(ev):
        s, t = e.time_range.start, e.time_range.end
        gap = 0.0 if prev_end is None else s - prev_end
        acc = sums[e.name[:70]]
        acc[0], acc[1], acc[2] = acc[0] + t - s, acc[1] + 1, acc[2] + gap
        if i < 16 or lo <= i < hi or i > len(ev) - 8:
            print(f"{i:4d} start {s - t0:9.1f} dur {t - s:7.2f} gap {gap:6.2f} {e.name[:70]}")
        prev_end = t if prev_end is None else max(prev_end, t)
    print(f"replay span {ev[-1].time_range.end - t0:.1f} us, {len(ev)} kernels")
    for name, (d, c, g) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
        print(f"{d:9.1f} us {c:4d} x  gaps {g:8.1f}  {name}")


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=32768)
    args = p.parse_args()
    n = args.length
    model = benchmark.build_model(llama31_8b_config(32, True, max_positions=n + 64), "cuda", torch.bfloat16)
    chunkinfer.convert(model)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    res = dict(length=n, call_ms_decode_ms=decode_ms(model, out, 30))
    cap = model._chunkinfer.graphs.captured(1, 1, 1)  # batch 1, one token, one row kept, no padding
    res.update(call_split(model, cache, nxt))
    walls = []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cap.graph.replay()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    res["replay_wall_ms"] = statistics.median(walls)
    res.update(  # the pieces, enqueue cost on the host
        bind_us=host_us(lambda: model._chunkinfer.signature.bind(model, nxt, past_key_values=cache, use_cache=True)),
        ids_copy_us=host_us(lambda: cap.ids.copy_(nxt)),
        positions_us=host_us(lambda: torch.arange(n, n + 1, out=cap.positions[0])),
        write_index_us=host_us(lambda: torch.arange(n, n + 1, out=cap.step.write_index)),
        logits_clone_us=host_us(lambda: cap.logits.clone()),
        output_object_us=host_us(lambda: CausalLMOutputWithPast(logits=cap.logits, past_key_values=cache)),
        replay_enqueue_us=host_us(lambda: cap.graph.replay(), reps=20),
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    timeline(cap.graph)


if __name__ == "__main__":
    main()
