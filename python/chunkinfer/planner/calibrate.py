"""calibrate(): measure a converted model's memory on short prefills; its later plans use the correction.

The planner's shapes (residual stream, KV, chunk work buffers) are exact allocations; what they miss
is per device and per install: workspaces and first-call buffers (a constant) and, on the CPU,
malloc's retention (a share). A run measures ``offset + scale x shapes``: one length gives the offset
(the scale stays the device default), two lengths give both. The result is kept on the converted
model (``model._chunkinfer.calibration``), not globally; converting again drops it.

Measured: on CUDA the peak of torch.cuda.max_memory_allocated() over the call, beyond what was
allocated before it; on the CPU the peak RSS (rss.py) beyond the RSS before it. Each length runs
once unmeasured, so that buffers made once per process (cuBLAS / oneDNN workspaces) are not taken for
per-call memory (per-call plans already count them as in use), then twice measured, keeping the larger:
on the CPU the same prefill's RSS varies by up to ~15% with malloc's history (glibc's moving mmap
threshold decides whether untouched KV headroom lands on fresh pages), and a plan is a bound.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kv.cache import ChunkKVCache
from ..convert import is_converted
from ..kv.placement import PromptCall, plan_prompt
from .memory import Calibration
from .units import device_kind
from .rss import current_rss, peak_rss, release_freed_memory, reset_peak_rss


@dataclasses.dataclass(frozen=True)
class CalibrationRun:
    seq_len: int
    chunk: int
    measured: int       # bytes beyond what was resident before the call
    shapes: int         # the plan's shape bytes for the call


def _measure(model, ids: torch.Tensor, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        release_freed_memory()
        reset_peak_rss()
        before = current_rss()
        out = model(ids, use_cache=True, logits_to_keep=1)
        peak = peak_rss() - before
    del out
    return peak


def _fit(runs: list[CalibrationRun], default: Calibration) -> Calibration:
    what = ", ".join(f"{r.seq_len} tokens (chunk {r.chunk}): {r.measured:,} B measured, {r.shapes:,} B shapes"
                     for r in runs)
    if len(runs) == 1:
        r = runs[0]
        return Calibration(r.measured - int(default.scale * r.shapes), default.scale, f"calibrate(): {what}")
    a, b = runs[0], runs[-1]
    # the shapes are exact allocations: a measured share below them is noise, not a smaller model
    scale = max(1.0, (b.measured - a.measured) / (b.shapes - a.shapes))
    return Calibration(a.measured - int(scale * a.shapes), scale, f"calibrate(): {what}")


@torch.no_grad()
def calibrate(model, seq_lens: tuple[int, ...] | None = None, *, chunk_size: int | None = None,
              seed: int = 0) -> Calibration:
    """Measure short prefills of random token ids through a converted ``model`` and keep the fitted
    ``Calibration`` on it; every later plan of this model (convert's per-prompt chunk choice and KV
    placement) uses it. ``chunk_size``: the chunk of these runs (default: the model's fixed chunk,
    ``convert.default_chunk_size`` unless given to convert); ``seq_lens``: one or two lengths
    (default: 4 chunks; the KV headroom of 1024 positions per layer, which the CPU leaves partly
    untouched and so out of the RSS, is then a small share). Returns the calibration. On the CPU this
    needs Linux's /proc (rss.py)."""
    if not is_converted(model):
        raise ValueError("chunkinfer.calibrate: convert the model first (chunkinfer.convert(model))")
    state = model._chunkinfer
    weight = state.binding.embed.weight
    device, dtype = weight.device, weight.dtype
    kind = device_kind(device.type) if device.type in ("cuda", "cpu") else None
    if kind is None:
        raise ValueError(f"chunkinfer.calibrate: measures CUDA or CPU models, this one is on {device}")
    chunk = chunk_size if chunk_size is not None else state.chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    lens = (4 * chunk,) if seq_lens is None else tuple(seq_lens)
    if not 1 <= len(lens) <= 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lens):
        raise ValueError(f"seq_lens must be one or two lengths >= 2 (tokens), got {seq_lens!r}")
    if len(lens) == 2 and lens[0] >= lens[1]:
        raise ValueError(f"seq_lens must be increasing, got {seq_lens!r}")
    if kind == "cpu":
        reset_peak_rss()  # fails here, before any work, where the kernel does not allow it

    # the runs use this chunk on resident KV, with the model's default correction
    run_state = dataclasses.replace(state, chunk_size=chunk, plan_chunks=False, memory_budget=None, offload=None,
                                    calibration=None, progress=None)
    runs, default = [], None
    gen = torch.Generator().manual_seed(seed)
    model._chunkinfer = run_state
    try:
        for n in lens:
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(device)
            _measure(model, ids, device)  # warm-up: buffers made once per process
            measured = max(_measure(model, ids, device) for _ in range(2))
            call = PromptCall(1, 0, n, dtype, device)
            p = plan_prompt(model, call, ChunkKVCache(len(state.binding.layers), windows=state.binding.windows), chunk_size=chunk, memory_budget=None)
            default = p.calibration
            runs.append(CalibrationRun(n, chunk, measured, p.shape_bytes))
    finally:
        model._chunkinfer = state
    state.calibration = _fit(runs, default)
    return state.calibration
