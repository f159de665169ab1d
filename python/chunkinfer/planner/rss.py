"""Resident set size (RSS) of a process on Linux: now, its peak, resetting the peak, a fresh interpreter's.

The CPU planner predicts a process's peak RSS; these are the measurements it is built on and checked
against. The peak is the kernel's high-water mark (VmHWM, what getrusage's ru_maxrss reports for a
live process); writing "5" to /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0), so
the peak of one phase (a prefill after a model load that itself peaked higher) can be read alone.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import subprocess
import sys

_STATUS = "/proc/self/status"


def _status_kib(field: str, status: str = _STATUS) -> int:
    try:
        with open(status) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError as exc:
        raise RuntimeError(f"cannot read {status}: the RSS is read from Linux's /proc") from exc
    raise RuntimeError(f"{status} has no {field} line")


def current_rss() -> int:
    """Bytes resident now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Bytes resident at the peak since the start or the last reset_peak_rss() (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Make the peak the current RSS. Raises RuntimeError where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs, Linux >= 4.0)") from exc


def release_freed_memory() -> None:
    """Collect garbage and hand memory malloc keeps after frees back to the system (glibc), so that
    the RSS holds live data only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (falls back to the physical size where it cannot be read)."""
    try:
        return _status_kib("MemAvailable", "/proc/meminfo") * 1024
    except RuntimeError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_BASELINE_CODE = """
import sys
sys.path.insert(0, {root!r})
import torch, transformers, chunkinfer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[{model_type!r}])  # imports the modeling code
from chunkinfer.planner.rss import current_rss
print(current_rss())
"""


@functools.cache
def fresh_process_baseline(model_type: str) -> int:
    """RSS of a fresh interpreter (this one's executable) once it has imported torch, transformers,
    chunkinfer and the modeling code of ``model_type``: what a process holds before any weights.
    Measured once per model type and process (a child process, a few seconds)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds chunkinfer/
    code = _BASELINE_CODE.format(root=root, model_type=model_type)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the process baseline failed: {done.stderr.strip()[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])
