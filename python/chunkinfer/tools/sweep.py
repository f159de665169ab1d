"""``chunkinfer bench``: stock transformers vs chunkinfer over context lengths, one JSON row per system and
length (written as each run ends, so an interrupted sweep keeps what it measured).

Lengths run shortest first, every system at one length before the next length, so a time limit cuts the
longest runs. A system that ran out of memory is not run again at longer lengths; a run whose estimated
time (the system's previous length scaled quadratically) would pass ``max_seconds`` is skipped.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from .benchmark import (build_model, catching_oom, decode_ms, memory_now, prefill, reset_memory, row, shape_config,
                        warm_up, weight_bytes)
from ..convert import check_chunk_size, convert, is_converted, revert
from ..planner.shape import load_config
from ..planner.units import parse_dtype
from .progress import ProgressBar

DECODE_WARMUP = 2  # the first steps after convert() capture the decode CUDA graph
WARMUP_TOKENS = 4096
# x4 steps: on an H200 the 8B shape up to 524288 should fit a 10-minute run (estimated from bench/results)
DEFAULT_LENGTHS = {"cuda": [8192, 32768, 131072, 524288], "cpu": [1024, 4096, 16384]}


@dataclass(frozen=True)
class System:
    name: str
    label: str
    chunkinfer: bool
    offload: bool


# Stock first at each length (its out-of-memory point is what the plot must show), the slow
# stock offloaded cache last.
SYSTEMS = (
    System("stock", "stock transformers (DynamicCache)", chunkinfer=False, offload=False),
    System("chunkinfer", "chunkinfer (KV on the device)", chunkinfer=True, offload=False),
    System("chunkinfer-offload", "chunkinfer, kv_offload=True", chunkinfer=True, offload=True),
    System("stock-offload", "stock, DynamicCache(offloading=True)", chunkinfer=False, offload=True),
)
SYSTEM_NAMES = [s.name for s in SYSTEMS]


@dataclass
class BenchSettings:
    lengths: list[int] | None = None       # None: DEFAULT_LENGTHS for the device
    systems: list[str] | None = None       # None: every system this machine can run
    shape: str | None = None               # None: llama-3.1-8b on CUDA, tiny on CPU (unless config is given)
    config: str | None = None              # a config.json / model directory instead of a built-in shape
    device: str | None = None              # None: cuda when available
    dtype: str | None = None               # None: bfloat16 on CUDA, float32 on CPU
    chunk_size: int | None = None
    resident_layers: int = 0               # chunkinfer-offload: leading layers whose KV stays on the device
    decode_steps: int = 5
    max_seconds: float | None = 540.0
    json_path: Path = Path("chunkinfer_bench.jsonl")
    png_path: Path | None = Path("chunkinfer_bench.png")
    progress: bool = True
    command: str = ""
    notes: list[str] = field(default_factory=list)


def _cuda_only(system: System) -> bool:
    return system.name == "stock-offload"  # transformers' offloaded cache prefetches on a CUDA stream


def resolve(s: BenchSettings) -> tuple[BenchSettings, object, torch.device, torch.dtype, list[System]]:
    """Check every argument before any work; returns the settings with defaults filled in, the config,
    device, dtype and systems."""
    from ..kv import transfer

    if s.device is None:
        s.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(s.device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {s.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu with --shape tiny)")
    dtype = parse_dtype(s.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if s.lengths is None:
        s.lengths = list(DEFAULT_LENGTHS[device.type])
    if not s.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in s.lengths):
        raise ValueError(f"--lengths must be integers >= 2 tokens, got {s.lengths}")
    s.lengths = sorted(set(s.lengths))
    check_chunk_size(s.chunk_size)
    if s.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {s.decode_steps}")
    if s.max_seconds is not None and s.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0, got {s.max_seconds}")
    if s.shape is not None and s.config is not None:
        raise ValueError("give --shape or --config, not both")
    if s.shape is None and s.config is None:
        s.shape = "llama-3.1-8b" if device.type == "cuda" else "tiny"
    max_positions = max(131072, s.lengths[-1] + s.decode_steps + DECODE_WARMUP + 1)
    config = shape_config(s.shape, max_positions) if s.shape is not None else load_config(s.config)
    if not 0 <= s.resident_layers <= config.num_hidden_layers:
        raise ValueError(f"--resident-layers must be in [0, {config.num_hidden_layers}] (the model's layers), "
                         f"got {s.resident_layers}")
    unknown = sorted(set(s.systems or []) - set(SYSTEM_NAMES))
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {SYSTEM_NAMES}")
    explicit = s.systems is not None
    systems = [sys_ for sys_ in SYSTEMS if not explicit or sys_.name in s.systems]
    usable = []
    for system in systems:
        why = None
        if _cuda_only(system) and device.type != "cuda":
            why = "needs CUDA"
        elif system.chunkinfer and system.offload and not transfer.available():
            why = "this chunkinfer build has no offload engine"
        if why is None:
            usable.append(system)
        elif explicit:
            raise ValueError(f"system {system.name!r} {why}")
        else:
            s.notes.append(f"{system.name}: not run ({why})")
    if not usable:
        raise ValueError("no system to run")
    if s.json_path.suffix == ".png" or (s.png_path is not None and s.png_path.resolve() == s.json_path.resolve()):
        raise ValueError(f"the JSON rows and the PNG need different files, got {s.json_path} and {s.png_path}")
    return s, config, device, dtype, usable


def _set_system(model: nn.Module, system: System, s: BenchSettings, bar: ProgressBar) -> None:
    if is_converted(model):
        revert(model)
    if system.chunkinfer:
        kw = dict(kv_offload=True, resident_layers=s.resident_layers) if system.offload else {}
        convert(model, chunk_size=s.chunk_size, progress=bar.update, **kw)


def _stock_cache_kw(model: nn.Module, system: System) -> dict:
    if system.chunkinfer or not system.offload:
        return {}
    from transformers import DynamicCache

    return {"past_key_values": DynamicCache(config=model.config, offloading=True)}


def _layer_hooks(model: nn.Module, bar: ProgressBar) -> list:
    """Stock runs each layer over the whole prompt: the bar counts layers."""
    layers = model.get_decoder().layers
    return [layer.register_forward_hook(lambda *_, i=i: bar.update(i + 1, len(layers)))
            for i, layer in enumerate(layers)]


def _free(device: torch.device) -> None:
    reset_memory(device)
    if device.type == "cuda":  # pinned blocks stock's offloaded cache leaves in PyTorch's host cache
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def run_one(model: nn.Module, system: System, ids: torch.Tensor, base: tuple, s: BenchSettings,
            bar: ProgressBar) -> dict:
    """One system at one length: warm-up, a timed prefill with its peak memory, timed decode steps."""
    device, length = ids.device, ids.shape[1]
    _set_system(model, system, s, bar)
    _, error = catching_oom(lambda: warm_up(model, min(WARMUP_TOKENS, s.lengths[0]), **_stock_cache_kw(model, system)))
    if error is not None:
        _free(device)
        return row(system.name, length, error=f"{error} (in the warm-up)", device=device)
    hooks = [] if system.chunkinfer else _layer_hooks(model, bar)
    if s.progress:
        bar.start(f"{system.name} {length} tokens", "chunks" if system.chunkinfer else "layers")
    try:
        r, out = prefill(model, ids, system.name, base[0], base[1], **_stock_cache_kw(model, system))
    finally:
        bar.finish()
        for h in hooks:
            h.remove()
    if out is not None:
        t = time.perf_counter()
        r["ms_per_token"], r["decode_error"] = catching_oom(lambda: decode_ms(model, out, s.decode_steps, DECODE_WARMUP))
        r["decode_seconds"] = time.perf_counter() - t
        if system.chunkinfer and system.offload:
            r["host_pinned_bytes"] = model._chunkinfer.host.arena.bytes_reserved
    del out
    _free(device)
    return r


def _skip_reason(system: System, length: int, oom_at: dict, history: dict, elapsed: float,
                 max_seconds: float | None) -> str | None:
    if system.name in oom_at:
        return f"skipped: out of memory at {oom_at[system.name]} tokens"
    if max_seconds is None:
        return None
    estimate = 0.0
    if system.name in history:
        prev_len, prev_prefill, prev_decode = history[system.name]
        ratio = length / prev_len
        estimate = prev_prefill * ratio ** 2 + prev_decode * ratio  # attention is quadratic, decode linear
    if elapsed + estimate > max_seconds:
        return (f"skipped: --max-seconds {max_seconds:g} (used {elapsed:.0f} s, this run estimated at "
                f"{estimate:.0f} s)")
    return None


def summary(r: dict) -> str:
    if r.get("skipped") or r["error"]:
        return f"{r['what']:>18} {r['length']:>9} tokens: {r.get('skipped') or r['error']}"
    mem, ms = r["peak_alloc_beyond_weights"], r["ms_per_token"]
    mem_s = "n/a" if mem is None else f"{mem / (1 << 30):.2f} GiB"
    ms_s = r.get("decode_error") if ms is None else f"{ms:.2f} ms/token"
    return (f"{r['what']:>18} {r['length']:>9} tokens: peak beyond weights {mem_s}, prefill "
            f"{r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.2f} s), decode {ms_s}")


def run(s: BenchSettings, render=None) -> list[dict]:
    """Runs the sweep, writing ``s.json_path`` (replaced) one row at a time; ``render(rows)`` is called
    after each length (the plot stays current if the sweep is cut short)."""
    t0 = time.perf_counter()
    s, config, device, dtype, systems = resolve(s)
    for note in s.notes:
        print(note, file=sys.stderr)
    model = build_model(config, device, dtype)
    reset_memory(device)
    base = memory_now(device)
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    meta = {"shape": s.shape or str(s.config), "model_type": config.model_type,
            "dtype": str(dtype).removeprefix("torch."), "chunk_size": s.chunk_size,
            "weights_bytes": weight_bytes(model), "device_memory_bytes": capacity,
            "chunkinfer": __version__, "command": s.command}
    labels = {x.name: x.label for x in SYSTEMS}
    s.json_path.parent.mkdir(parents=True, exist_ok=True)
    s.json_path.write_text("")
    bar = ProgressBar()
    rows: list[dict] = []
    oom_at: dict[str, int] = {}
    history: dict[str, tuple[int, float, float]] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for length in s.lengths:
            ids = torch.randint(0, config.vocab_size, (1, length), generator=gen).to(device)
            for system in systems:
                reason = _skip_reason(system, length, oom_at, history, time.perf_counter() - t0, s.max_seconds)
                if reason is not None:
                    r = row(system.name, length, device=device)
                    r["skipped"] = reason
                else:
                    r = run_one(model, system, ids, base, s, bar)
                    if r["oom"]:
                        oom_at[system.name] = length
                    elif r["seconds"] is not None:
                        history[system.name] = (length, r["seconds"], r.get("decode_seconds", 0.0))
                r.setdefault("skipped", None)
                r = {**r, "label": labels[system.name], **meta,
                     "resident_layers": s.resident_layers if system.name == "chunkinfer-offload" else None}
                rows.append(r)
                with s.json_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(summary(r), flush=True)
            del ids
            if render is not None:
                render(rows)
    if is_converted(model):
        revert(model)
    return rows
