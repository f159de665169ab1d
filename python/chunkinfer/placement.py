"""Which layers' KV stay on the device for a call: the planner's answer for the memory actually there.

Decided before any work of a prompt (not of single-token decode steps, which keep the placement the
prompt chose); a verdict that it does not fit is raised as InsufficientMemoryError, naming the bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .cache import ChunkKVLayer
from .plan import _CUDA_CONTEXT, GiB, Plan, plan


class InsufficientMemoryError(MemoryError):
    """The planner predicts the call does not fit the device or host memory; raised before any work."""


@dataclass(frozen=True)
class OffloadSettings:
    """convert(kv_offload=True, ...)'s choices."""

    memory_budget: int | None      # device bytes the model may occupy in all (None: what the device has)
    resident_layers: int | None    # fixed count of leading layers kept on the device (None: planned)


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (falls back to the physical size where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _device_budget(settings: OffloadSettings, device: torch.device, weight_bytes: int, cache_bytes: int) -> int:
    """Device bytes the plan may fill (weights included). Tensors the caller holds besides the model and
    this cache are taken off; the cache's own buffers count as free, since the plan re-places them."""
    free, _total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    others = max(0, torch.cuda.memory_allocated(device) - weight_bytes - cache_bytes)
    usable = free + reserved + _CUDA_CONTEXT - others
    return usable if settings.memory_budget is None else min(settings.memory_budget, usable)


def plan_call(model, settings: OffloadSettings, cache, batch: int, end: int, chunk: int, dtype: torch.dtype,
              device: torch.device) -> Plan | None:
    """The plan for a prompt reaching ``end`` cached positions, or None on a CPU model with no fixed
    placement (nothing to plan: host memory is the device). Raises InsufficientMemoryError."""
    if device.type != "cuda":
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)
    cache_bytes = sum(layer.nbytes() for layer in cache.layers if isinstance(layer, ChunkKVLayer))
    cache_bytes += cache.staging.nbytes() if cache.staging is not None else 0
    budget = _device_budget(settings, device, weight_bytes, cache_bytes)
    host_kv = sum(2 * layer.k_buf.numel() * layer.k_buf.element_size()
                  for layer in cache.layers if not isinstance(layer, ChunkKVLayer) and layer.k_buf is not None)
    arena = cache.host.arena
    host = host_available_bytes() + (arena.bytes_reserved - arena.bytes_used) + host_kv
    p = plan(model.config, end, batch=batch, dtype=dtype, device_memory=budget, host_memory=host,
             chunk_size=chunk, allow_offload=True, resident_layers=settings.resident_layers)
    if not p.fits:
        raise InsufficientMemoryError(f"chunkinfer: {end:,} cached tokens x batch {batch} do not fit: {p.reason} "
                                      f"(device budget {budget / GiB:.2f} GiB, host available {host / GiB:.2f} GiB)")
    return p


def place_for_call(model, settings: OffloadSettings, cache, batch: int, end: int, chunk: int,
                   dtype: torch.dtype, device: torch.device) -> Plan | None:
    """Plan the call and move the layers the plan puts on the host there (a layer never moves back)."""
    p = plan_call(model, settings, cache, batch, end, chunk, dtype, device)
    n_layers = len(cache.layers)
    if p is not None:
        n_resident = len(p.resident_layers)
    else:
        n_resident = n_layers if settings.resident_layers is None else settings.resident_layers
    streamed = cache.streamed_layers()
    if streamed:
        n_resident = min(n_resident, streamed[0])
    if n_resident < n_layers:
        cache.place(n_resident)
    return p
