"""One build's 8B-shape decode step, for A/B runs of kernel variants: the model() call (median of 40,
twice) and the graph replay's GPU time (median and min of 60), as one JSON line per length.

    PYTHONPATH=<variant tree>/python python -m bench.decode_step_ab TAG 32768 [131072 ...]

Each variant is a copy of the source tree built in place (`python3 setup.py build_ext --inplace`);
run the variants alternately, each in its own process, on one machine (H200s differ by ~0.2 ms).
--attention-waits: the decode attention waits for the kernel ahead before loading any key
(prefix_ready=False), to measure what loading older keys early is worth.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import chunkinfer
from chunkinfer import ops
from chunkinfer.tools import benchmark
from chunkinfer.tools.benchmark import decode_ms, llama31_8b_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("tag")
    p.add_argument("lengths", type=int, nargs="*", default=[32768])
    p.add_argument("--attention-waits", action="store_true")
    args = p.parse_args()
    assert chunkinfer.build_info()["cuda_kernels"], "this build has no CUDA kernels"
    if args.attention_waits:
        early = ops.decode_attention
        ops.decode_attention = lambda *a, **k: early(*a, **{**k, "prefix_ready": False})
    with torch.inference_mode():
        model = benchmark.build_model(llama31_8b_config(32, False, max_positions=262144), "cuda", torch.bfloat16)
        chunkinfer.convert(model)
        for n in args.lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
            out = model(ids, use_cache=True, logits_to_keep=1)
            call = decode_ms(model, out, steps=40)
            graph = model._chunkinfer.graphs.captured(1, 1, 1).graph  # batch 1, one token, one row kept
            gpu = []
            for _ in range(60):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                gpu.append(start.elapsed_time(end))
            call2 = decode_ms(model, out, steps=40)
            print(json.dumps(dict(tag=args.tag, length=n, call_ms=round(call, 4), call2_ms=round(call2, 4),
                                  replay_ms=round(statistics.median(gpu), 4), replay_min=round(min(gpu), 4))),
                  flush=True)
            del out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
