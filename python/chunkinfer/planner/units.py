"""Units and argument checks shared by the planner, convert() and the command line: sizes, dtypes, counts."""
from __future__ import annotations

import math
import re

import torch

GiB = 1 << 30

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEM_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_memory(value, what: str = "memory", *, require_unit: bool = False) -> int:
    """Bytes from an int or a string such as "139GiB", "80GB", "512MiB", "1.5TiB" (GB = 10^9, GiB = 2^30).

    ``require_unit``: a string must name its unit (the command line: "--gpu 80" is surely not 80 bytes)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be bytes (int) or a string like '80GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what} must be > 0 bytes, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} must be a positive number of bytes, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be bytes (int) or a string like '80GiB', got {type(value).__name__}")
    m = _MEM_RE.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot parse {what} {value!r}: expected a number with an optional unit "
                         "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. '139GiB'")
    if require_unit and not unit:
        raise ValueError(f"{what} {value!r} has no unit: write it with one, e.g. '{m.group(1)}GiB' or "
                         f"'{m.group(1)}GB' (or '{m.group(1)}B' if bytes are really meant)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{what} must be > 0 bytes, got {value!r}")
    return n


_COUNT_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_count(value, what: str = "count") -> int:
    """A positive whole count from an int or a string with an optional binary suffix, as context lengths
    are named: "131072", "128k" (= 131,072), "1M" (= 1,048,576), "1.5M" (= 1,572,864)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return positive_int(value, what)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a whole number or a string like '128k', got {type(value).__name__}")
    m = _MEM_RE.match(value.replace(",", "").replace("_", ""))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _COUNT_UNITS:
        raise ValueError(f"cannot parse {what} {value!r}: expected a whole number, optionally with k (x1024) or "
                         "M (x1048576), e.g. 131072, 128k, 1M")
    n = float(m.group(1)) * _COUNT_UNITS[unit]
    if n != int(n):
        raise ValueError(f"{what} {value!r} is not a whole number ({n:g})")
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {value!r}")
    return int(n)


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of bfloat16, float16, float32")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32 (or a torch.dtype)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def device_kind(device) -> str:
    """'cuda' or 'cpu' from a string or torch.device."""
    kind = device.type if isinstance(device, torch.device) else device
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu' (or a torch.device of those), got {device!r}")
    return kind

