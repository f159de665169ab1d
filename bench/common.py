"""Shared benchmark plumbing: CUDA-event timing, the copy-bandwidth ceiling, JSON rows, tables."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20, device: str = "cuda") -> float:
    """Median wall time of fn in milliseconds: CUDA events on the GPU, a synchronised clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a large device-to-device copy: the memory-bound ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device=device)
    return 2 * nbytes / ms / 1e6


def environment() -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_rows(path: str | Path, rows: list[dict], command: str) -> None:
    """Appends rows as JSON lines, each with the command that produced it and the environment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "command": command, **env}) + "\n")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
