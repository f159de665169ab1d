"""Steps on a long cache: T new tokens per call (T = 1 ... 64), speculative decoding's ceiling and
exactness, and steps over host-resident KV. Llama-3.1-8B shape, bf16, random weights on the GPU.

    python -m bench.bench_steps --lengths 131072 --out bench/results/steps_h200.jsonl
    python -m bench.bench_steps --lengths --exact-length 32768 --exact-tokens 512     # exactness only
    python -m bench.bench_steps --lengths --offload-length 262144                      # host KV only

Rows (JSON lines, appended to --out) and a markdown table on stdout:
  step T          one forward of T new tokens on a cache of `length` positions (logits of all T rows, as a
                  verification asks), median of --reps; the cache cropped back after each
  append T        the same with logits_to_keep=1 (a chat turn appended)
  generate        generate()'s ms per new token from the cached prompt, plain greedy
  speculate       the same with an assistant that replays plain greedy's own continuation (--drafts per
                  verification: every draft accepted, the ceiling of speculation); tokens compared
  exact           greedy vs prompt lookup vs the replaying assistant over --exact-tokens tokens: identical?
  host step T     steps with every layer's KV in pinned host memory (kv_offload=True, resident_layers=0)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

import chunkinfer  # the installed package: its compiled kernels, not the source tree
from bench.common import markdown_table, write_rows
from chunkinfer.tools import benchmark
from chunkinfer.tools.benchmark import llama31_8b_config, reset_memory, row
from chunkinfer.tools.replay import ReplayAssistant


def _sync_ms(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def step_ms(model, cache, tokens: torch.Tensor, keep: int, reps: int) -> float:
    """Median host-observed ms of one step of tokens [1, T] on the cache, cropped back after each."""
    times = []
    for i in range(reps + 2):  # the first two capture and warm the graph
        ms = _sync_ms(lambda: model(tokens, past_key_values=cache, logits_to_keep=keep))
        cache.crop(-tokens.shape[1])
        if i >= 2:
            times.append(ms)
    return statistics.median(times)


class DecodeClock(BaseStreamer):
    """generate()'s streamer that notes when each batch of new tokens arrives: the time from the first
    new tokens (the prompt's prefill done) to the end, over the tokens after them, is the decode rate."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []  # (seconds, new tokens so far)
        self.seen = -1  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seen += 0 if self.seen < 0 else value.numel()
        self.seen = max(self.seen, 0)
        self.marks.append((time.perf_counter(), self.seen))

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float:
        (t1, n1), (t2, n2) = self.marks[1], self.marks[-1]
        return (t2 - t1) * 1e3 / max(n2 - n1, 1)


def generate_ms(model, ids: torch.Tensor, new: int, **kw) -> tuple[float, torch.Tensor]:
    """ms per new token of generate() on ids [1, L] after its first new tokens (the prefill excluded),
    and the new tokens."""
    clock = DecodeClock()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock, **kw)
    return clock.ms_per_token(), out[:, ids.shape[1]:]


def prompt_cache(model, ids: torch.Tensor):
    return model(ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values


def steps_rows(model, length: int, tokens: list[int], reps: int, new: int, drafts: int, label: str) -> list[dict]:
    device = model.model.embed_tokens.weight.device
    where = device.type
    ids = torch.randint(3, model.config.vocab_size, (1, length), device=device)
    cache = prompt_cache(model, ids)
    rows = []
    extra = torch.randint(3, model.config.vocab_size, (1, max(tokens)), device=device)
    cache.crop(-1)  # steps start from length - 2 cached positions
    base = cache.get_seq_length()
    for t in tokens:
        ms = step_ms(model, cache, extra[:, :t], t, reps)
        rows.append(row(f"{label} step {t}", base, ms / 1e3, tokens=t, ms_per_token=ms, device=where))
        print(rows[-1], file=sys.stderr, flush=True)
        if t > 1:
            ms = step_ms(model, cache, extra[:, :t], 1, reps)
            rows.append(row(f"{label} append {t}", base, ms / 1e3, tokens=t, ms_per_token=ms, device=where))
    del cache
    if new:  # generate() from the prompt (each call prefills it again; the clock starts after the prefill)
        plain_ms, plain = generate_ms(model, ids, new)
        rows.append(row(f"{label} generate", length, plain_ms * new / 1e3, tokens=new, ms_per_token=plain_ms,
                        device=where))
        assistant = ReplayAssistant.of(model, ids, plain, drafts=drafts)
        generate_ms(model, ids, 2 * drafts + 2, assistant_model=assistant)  # warm-up: graphs of T = drafts + 1
        spec_ms, spec = generate_ms(model, ids, new, assistant_model=assistant)
        same = bool(torch.equal(spec, plain))
        rows.append(row(f"{label} speculate ({drafts} drafts, all accepted)", length, spec_ms * new / 1e3, device=where,
                        tokens=new, ms_per_token=spec_ms, identical_to_greedy=same,
                        ratio_to_greedy=spec_ms / plain_ms))
    return rows


def exact_rows(model, length: int, new: int, drafts: int, label: str) -> list[dict]:
    """Greedy vs prompt lookup vs the replaying assistant: every token identical (bf16)?"""
    base = torch.randint(3, model.config.vocab_size, (1, length // 2), device=model.model.embed_tokens.weight.device)
    ids = torch.cat([base, base], dim=1)[:, :length]  # repeats itself: prompt lookup finds drafts
    where = ids.device.type
    _, plain = generate_ms(model, ids, new)
    _, looked = generate_ms(model, ids, new, prompt_lookup_num_tokens=drafts)
    _, replayed = generate_ms(model, ids, new, assistant_model=ReplayAssistant.of(model, ids, plain, drafts))
    first_diff = [int((x != plain).nonzero()[0, 1]) if not torch.equal(x, plain) else None for x in (looked, replayed)]
    return [row(f"{label} exact: prompt lookup vs greedy", length, device=where, tokens=new, identical=first_diff[0] is None,
                first_difference=first_diff[0]),
            row(f"{label} exact: replaying assistant vs greedy", length, device=where, tokens=new, identical=first_diff[1] is None,
                first_difference=first_diff[1])]


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="*", default=[131072])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--generate-tokens", type=int, default=64)
    p.add_argument("--drafts", type=int, default=8)
    p.add_argument("--exact-length", type=int, default=0)
    p.add_argument("--exact-tokens", type=int, default=512)
    p.add_argument("--offload-length", type=int, default=0)
    p.add_argument("--offload-tokens", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--shape", choices=["8b", "tiny"], default="8b", help="tiny: a CPU check of the script")
    p.add_argument("--out", type=Path, default=Path("bench/results/steps_h200.jsonl"))
    args = p.parse_args()
    args.device = "cpu" if args.shape == "tiny" else "cuda"
    command = "python -m bench.bench_steps " + " ".join(sys.argv[1:])
    longest = max([*args.lengths, args.exact_length, args.offload_length, 4096])
    if args.shape == "tiny":
        model = benchmark.build_model(benchmark.tiny_config(max_positions=longest + 4096), "cpu", torch.float32)
    else:
        model = benchmark.build_model(llama31_8b_config(args.layers, True, max_positions=longest + 4096), "cuda",
                                      torch.bfloat16)
    rows = []
    if args.lengths or args.exact_length:
        chunkinfer.convert(model)
        for length in args.lengths:
            reset_memory(args.device)
            rows += steps_rows(model, length, args.tokens, args.reps, args.generate_tokens, args.drafts, "chunkinfer")
        if args.exact_length:
            reset_memory(args.device)
            rows += exact_rows(model, args.exact_length, args.exact_tokens, args.drafts, "chunkinfer")
    if args.offload_length:
        chunkinfer.convert(model, kv_offload=True, resident_layers=0)
        reset_memory(args.device)
        rows += steps_rows(model, args.offload_length, args.offload_tokens, 3, 0, args.drafts, "chunkinfer host KV")
    write_rows(args.out, rows, command)
    print(markdown_table(rows, ["what", "length", "tokens", "ms_per_token", "ratio_to_greedy", "identical_to_greedy",
                                "identical", "first_difference"]))


if __name__ == "__main__":
    main()
