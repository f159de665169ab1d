"""Locate the real CUDA toolkit.

Stdlib only: ``setup.py`` loads this file by path before torch's ``cpp_extension`` is imported,
because that module fixes its ``CUDA_HOME`` guess at import time. The guess it makes from the
``nvcc`` on PATH is wrong when that ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` gives
``/usr/local``, which has no ``lib64/libcudart``), so we look for the directory that really holds
both the compiler and the runtime library.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

_CUDART_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


def is_cuda_toolkit(root: str | os.PathLike) -> bool:
    """A toolkit root has ``bin/nvcc`` and a ``libcudart`` next to it."""
    root = Path(root)
    if not (root / "bin" / "nvcc").is_file():
        return False
    return any(glob.glob(str(root / d / "libcudart.so*")) for d in _CUDART_DIRS)


def _wrapper_target(nvcc: str) -> str | None:
    """If ``nvcc`` is a small shell script that execs another nvcc, return that path."""
    try:
        if os.path.getsize(nvcc) > 4096:
            return None
        text = Path(nvcc).read_text(errors="ignore")
    except OSError:
        return None
    match = re.search(r"(/\S+/bin/nvcc)\b", text)
    return match.group(1) if match else None


def _candidates() -> list[str]:
    out: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        out.append(str(Path(real).parent.parent))
        target = _wrapper_target(real)
        if target:
            out.append(str(Path(os.path.realpath(target)).parent.parent))
    out.append("/usr/local/cuda")
    out.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    return out


def find_cuda_home() -> str | None:
    """The first real CUDA toolkit root, or None when there is none on this machine.

    An explicit ``CUDA_HOME`` that is not a toolkit is an error rather than silently skipped:
    the user asked for that one.
    """
    explicit = os.environ.get("CUDA_HOME")
    if explicit and not is_cuda_toolkit(explicit):
        raise RuntimeError(
            f"CUDA_HOME={explicit!r} is not a CUDA toolkit: expected bin/nvcc and lib64/libcudart.so there"
        )
    for root in _candidates():
        if is_cuda_toolkit(root):
            return os.path.realpath(root)
    return None
