"""Prompt lookup on real text: SmolLM2-135M-Instruct asked to rewrite a source file with one change (the
answer copies most of the prompt, where prompt lookup's drafts are accepted). Stock transformers and
chunkinfer, plain greedy and prompt lookup, on the CPU in fp32 (the GGUF's weights dequantised).

    python -m bench.bench_prompt_lookup --out bench/results/prompt_lookup_cpu.jsonl

Rows (JSON lines appended to --out) and a markdown table on stdout, one per system and decoding:
  seconds, tokens/s    generate()'s wall time for the new tokens, the prompt's prefill included
                       (median of --reps; the first call of each also warms up)
  forwards             model calls in one generate() (a prompt lookup step verifies its drafts in one call)
  accepted, drafted    drafts accepted and drafts verified over the steps after the prompt's call
  same_as_own_greedy   the new tokens equal the same system's plain greedy ones (chunkinfer promises it)
  same_as_stock_greedy the new tokens equal stock's plain greedy ones (fp32: a near-tie may differ)
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import textwrap
import time

import torch
import transformers as T

import chunkinfer
from bench.common import markdown_table, write_rows
from chunkinfer.tools.models import smollm2_gguf

TASK = "Rewrite this Python module exactly as it is, except that the function `{old}` is renamed to `{new}` " \
       "everywhere. Answer with the code only.\n\n```python\n{code}```"


def prompt_ids(tok, source_lines: int) -> torch.Tensor:
    """The chat prompt: the rewrite task over the first source_lines lines of the standard library's textwrap."""
    code = "".join(inspect.getsourcelines(textwrap)[0][:source_lines])
    text = TASK.format(old="dedent", new="remove_common_indent", code=code)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return ids


class ForwardCounter:
    """Counts a model's calls and the new tokens each one is given (a pre-hook: the converted forward too)."""

    def __init__(self, model: torch.nn.Module):
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(int(ids.shape[1]))

    def accepted_drafted(self, new_tokens: int) -> tuple[int, int]:
        """(accepted, drafted): each step after the prompt's call verifies len - 1 drafts and yields the
        accepted ones plus one token of its own; the prompt's call yields the first."""
        steps = self.lengths[1:]
        return new_tokens - 1 - len(steps), sum(n - 1 for n in steps)


def run(model, ids: torch.Tensor, new_tokens: int, reps: int, **kw) -> dict:
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
    model.generate(ids, **gen)  # warm-up
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model.generate(ids, **gen)
        times.append(time.perf_counter() - t0)
    counter = ForwardCounter(model)
    model.generate(ids, **gen)
    counter.handle.remove()
    n = out.shape[1] - ids.shape[1]
    accepted, drafted = counter.accepted_drafted(n)
    seconds = statistics.median(times)
    return {"tokens": out[0, ids.shape[1]:].tolist(), "new_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
            "forwards": len(counter.lengths), "accepted": accepted, "drafted": drafted}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-lines", type=int, default=120, help="lines of textwrap.py in the prompt")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--drafts", type=int, default=10, help="prompt_lookup_num_tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON lines file to append the rows to")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    gguf = smollm2_gguf()
    tok = T.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = T.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                   attn_implementation="sdpa").eval()
    ids = prompt_ids(tok, args.source_lines)
    print(f"prompt: {ids.shape[1]} tokens, {args.new_tokens} new, {args.drafts} drafts, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    rows = []
    for system in ("stock", "chunkinfer"):
        if system == "chunkinfer":
            chunkinfer.convert(model)
        for decoding, kw in (("greedy", {}), ("prompt lookup", {"prompt_lookup_num_tokens": args.drafts})):
            r = run(model, ids, args.new_tokens, args.reps, **kw)
            rows.append({"what": "prompt lookup on real text", "system": system, "decoding": decoding,
                         "model": "SmolLM2-135M-Instruct (GGUF Q4_1, fp32)", "device": "cpu",
                         "threads": torch.get_num_threads(), "prompt_tokens": ids.shape[1], "drafts": args.drafts,
                         **r})
            print(f"{system} {decoding}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    reference = rows[0]["tokens"]
    greedy = {r["system"]: r for r in rows if r["decoding"] == "greedy"}
    for r in rows:
        r["same_as_own_greedy"] = r["tokens"] == greedy[r["system"]]["tokens"]
        r["same_as_stock_greedy"] = r["tokens"] == reference
        r["speedup_vs_greedy"] = greedy[r["system"]]["seconds"] / r["seconds"]
        r["acceptance"] = r["accepted"] / r["drafted"] if r["drafted"] else None
    print(markdown_table(rows, ["system", "decoding", "new_tokens", "seconds", "tokens_per_s", "speedup_vs_greedy",
                                "forwards", "accepted", "drafted", "acceptance", "same_as_own_greedy",
                                "same_as_stock_greedy"]))
    print("\nanswer:\n" + tok.decode(reference), file=sys.stderr)
    if args.out:
        write_rows(args.out, [{k: v for k, v in r.items() if k != "tokens"} for r in rows], " ".join(sys.argv))
    ours = [r for r in rows if r["system"] == "chunkinfer"]
    return 0 if all(r["same_as_own_greedy"] for r in ours) else 1  # the promise: speculation changes no token


if __name__ == "__main__":
    sys.exit(main())
