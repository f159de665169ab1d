"""Measurement helpers shared by ``chunkinfer bench`` and the scripts in bench/: random-weight models built
from a config, peak memory beyond the weights, a timed prefill and timed decode steps.

Memory on CUDA is the caching allocator's peak (allocated and reserved). On CPU it is the process's peak
resident set (VmHWM, restarted through /proc/self/clear_refs; Linux only), and there is no reserved figure.
"""
from __future__ import annotations

import gc
import platform
import statistics
import time
from typing import Callable

import torch
import transformers as T
from torch import nn

from ..kv.placement import InsufficientMemoryError
from ..planner.rss import available_memory, current_rss, peak_rss, release_freed_memory, reset_peak_rss

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama31_8b_config(layers: int = 32, llama3_rope: bool = True, max_positions: int = 131072) -> T.LlamaConfig:
    """Llama-3.1-8B's shape: 4096 hidden, 32 heads over 8 KV heads, 14336 MLP, 128256 vocabulary."""
    rope = LLAMA3_ROPE if llama3_rope else {"rope_type": "default", "rope_theta": 500000.0}
    return T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                         max_position_embeddings=max_positions, rope_parameters=dict(rope), tie_word_embeddings=False)


def tiny_config(max_positions: int = 131072) -> T.LlamaConfig:
    """The same layout (GQA 4:1, llama3 rope) small enough for a CPU test; head_dim 64 so that on CUDA the
    decode kernel and graph run."""
    return T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=512, rms_norm_eps=1e-5, max_position_embeddings=max_positions,
                         rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False)


SHAPES: dict[str, Callable[[int], T.PretrainedConfig]] = {
    "llama-3.1-8b": lambda max_positions: llama31_8b_config(max_positions=max_positions),
    "tiny": lambda max_positions: tiny_config(max_positions),
}


def shape_config(name: str, max_positions: int = 131072) -> T.PretrainedConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; built in: {', '.join(SHAPES)}")
    return SHAPES[name](max_positions)


def build_model(config: T.PretrainedConfig, device="cuda", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A causal LM with random weights, created on ``device`` in ``dtype`` (no host copy of a large model)."""
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- memory --------------------------------------------------------------------------------------------------
def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _rss(read: Callable[[], int]) -> int | None:
    try:
        return read()
    except RuntimeError:  # no Linux /proc: no CPU figure
        return None


def reset_memory(device="cuda") -> None:
    """Free what the allocator caches (on CPU: what malloc keeps after frees) and restart the peak counters."""
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    release_freed_memory()
    try:
        reset_peak_rss()
    except RuntimeError:  # no Linux /proc: no CPU figures to restart
        pass


def memory_now(device="cuda") -> tuple[int | None, int | None]:
    """(allocated, reserved) bytes now; on CPU (resident set, None)."""
    if _is_cuda(device):
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    return _rss(current_rss), None


def memory_peak(device="cuda") -> tuple[int | None, int | None]:
    """(allocated, reserved) peak bytes since reset_memory(); on CPU (peak resident set, None)."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return _rss(peak_rss), None


def free_memory(device="cuda") -> int:
    """Bytes this process could still take: the device's free memory, or the host's MemAvailable."""
    if _is_cuda(device):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return available_memory()


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def device_name(device="cuda") -> str:
    if _is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {n} thread{'s' if n > 1 else ''}"


# ---- timing ----------------------------------------------------------------------------------------------------
def timed(fn, device="cuda"):
    """(fn(), wall seconds), synchronised with the GPU on CUDA."""
    cuda = _is_cuda(device)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, the CPU allocator's failure, or the planner refusing a prompt that cannot fit."""
    if isinstance(exc, (torch.OutOfMemoryError, InsufficientMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def catching_oom(fn):
    """(fn(), None), or (None, "OOM: <first line>") when it runs out of memory. The exception (and the
    failed call's tensors its traceback holds) is gone when this returns, so memory can be freed."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - anything but running out of memory is re-raised
        if not is_out_of_memory(exc):
            raise
        message = f"OOM: {str(exc).strip().splitlines()[0]}"
    return None, message


def row(what, length, seconds=None, peak_alloc=None, peak_reserved=None, tokens=None, ms_per_token=None,
        error=None, device="cuda", **extra) -> dict:
    """One measurement as a JSON-able dict; ``extra`` adds fields of the benchmark's own."""
    return {"what": what, "length": length, "seconds": seconds, "peak_alloc_beyond_weights": peak_alloc,
            "peak_reserved_beyond_weights": peak_reserved,
            "tokens_per_s": (tokens / seconds) if (tokens and seconds) else None, "ms_per_token": ms_per_token,
            "error": error, "oom": bool(error and error.startswith("OOM")), "torch": torch.__version__,
            "transformers": T.__version__, "device": device_name(device), **extra}


def prefill(model, ids, label, base_alloc, base_reserved, reps: int = 1, **forward_kw):
    """(row, output) of a prompt: median time of ``reps`` prefills (short ones vary run to run), the peak
    memory of the last one beyond (base_alloc, base_reserved). Out of memory gives (row with the error,
    None) and frees what the failed call held. ``forward_kw`` go to the model call (e.g. a stock offloaded
    cache as past_key_values)."""
    device = ids.device
    times: list[float] = []

    def run():
        out = None
        for _ in range(reps):
            out = None
            reset_memory(device)
            out, sec = timed(lambda: model(ids, use_cache=True, logits_to_keep=1, **forward_kw), device)
            times.append(sec)
        return out

    out, error = catching_oom(run)
    if error is not None:
        forward_kw.clear()  # e.g. a cache object half filled by the failed call
        reset_memory(device)
        return row(label, ids.shape[1], error=error, device=device), None
    alloc, reserved = memory_peak(device)
    r = row(label, ids.shape[1], statistics.median(times), _minus(alloc, base_alloc), _minus(reserved, base_reserved),
            tokens=ids.shape[1], device=device)
    r["prefill_times"] = times
    return r, out


def decode_ms(model, out, steps: int, warmup: int = 5) -> float:
    """Median ms of a one-token step after the prompt in ``out``; the cache is cropped back after each
    step so every step sees the same cached length."""
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(steps + warmup):
        _, sec = timed(lambda: model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1), nxt.device)
        if i >= warmup:
            times.append(sec * 1e3)
        if hasattr(cache, "crop"):
            cache.crop(-1)  # keep the cached length fixed
    return statistics.median(times)


@torch.no_grad()  # a converted model runs stock transformers' forward while autograd records
def warm_up(model, length: int = 4096, **forward_kw) -> None:
    """cuBLAS/cuDNN plans, allocator pools and graph captures, so the first timed length is not cold."""
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    out = model(ids, use_cache=True, logits_to_keep=1, **forward_kw)
    model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    del out
    reset_memory(device)
