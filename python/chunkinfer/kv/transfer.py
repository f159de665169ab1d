"""The host side of KV offload: ``PinnedArena`` and ``KVTransferEngine`` from the compiled core.

Both classes live in C++ (csrc/offload); this module re-exports them with type hints. Without the
compiled extension (or with one built before these classes existed) the names are still importable
but constructing either raises RuntimeError saying why: there is no pure-Python fallback, since
neither pinned memory nor copy streams can be had without it.

Errors: ValueError for bad arguments (shapes, strides, dtypes, devices, ranges, unpinned host
memory, unknown tickets, negative sizes); RuntimeError when memory or a CUDA call fails, or when
pinned memory / a GPU engine is asked for where there is no CUDA build or device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..ops import library

__all__ = ["PinnedArena", "KVTransferEngine", "available", "require"]

if TYPE_CHECKING:

    class PinnedArena:
        """Host memory in large slabs, handed out as exact-size, 256-byte-aligned CPU tensors."""

        def __init__(self, slab_bytes: int = 1 << 30, pinned: bool = True, device: int = 0) -> None: ...
        def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...
        def grow_async(self, total_bytes: int, region_bytes: int = 0) -> None: ...
        def wait_grown(self) -> None: ...
        def trim(self) -> int: ...
        @property
        def bytes_reserved(self) -> int: ...
        @property
        def bytes_used(self) -> int: ...
        @property
        def slab_count(self) -> int: ...
        @property
        def slab_bytes(self) -> int: ...
        @property
        def pinned(self) -> bool: ...
        @property
        def device(self) -> int: ...
        @property
        def growing(self) -> bool: ...

    class KVTransferEngine:
        """Position-range copies of [B, H, capacity, D] KV buffers between GPU and pinned host memory."""

        def __init__(self, device: int = 0) -> None: ...
        def offload(self, src_gpu: torch.Tensor, dst_host: torch.Tensor, p0: int, p1: int,
                    dst_p0: int = -1) -> int: ...
        def prefetch(self, src_host: torch.Tensor, dst_gpu: torch.Tensor, p0: int, p1: int,
                     dst_p0: int = -1) -> int: ...
        def wait(self, ticket: int) -> None: ...
        def synchronize(self, ticket: int = -1) -> None: ...
        def done(self, ticket: int) -> bool: ...
        @property
        def bytes_to_host(self) -> int: ...
        @property
        def bytes_to_device(self) -> int: ...
        @property
        def pending(self) -> int: ...
        @property
        def last_ticket(self) -> int: ...
        @property
        def device(self) -> int: ...

else:

    def _unavailable(name: str, reason: str) -> type:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"chunkinfer.transfer.{name} needs the compiled extension chunkinfer._C, "
                               f"which {reason}; build it with `python setup.py build_ext --inplace`")

        return type(name, (), {"__init__": __init__, "__doc__": f"Unavailable: chunkinfer._C {reason}."})

    if library.extension is None:
        _reason = f"could not be loaded ({library.LOAD_ERROR})"
        PinnedArena = _unavailable("PinnedArena", _reason)
        KVTransferEngine = _unavailable("KVTransferEngine", _reason)
    else:
        _stale = "was built without it (a build older than csrc/offload): rebuild"
        PinnedArena = getattr(library.extension, "PinnedArena", None) or _unavailable("PinnedArena", _stale)
        KVTransferEngine = getattr(library.extension, "KVTransferEngine", None) or _unavailable("KVTransferEngine", _stale)


def available() -> bool:
    """Whether this install has the compiled offload classes."""
    return library.extension is not None and hasattr(library.extension, "KVTransferEngine")


def require() -> None:
    """Raise RuntimeError naming the reason when the offload classes are not built."""
    if not available():
        KVTransferEngine(-1)  # raises with the reason
