"""Per prompt, the planner's answer for the memory actually there: the chunk schedule and, with KV
offload, which layers' KV stay on the device.

Decided before any work of a prompt (not of single-token decode steps, which keep the placement the
prompt chose); a verdict that it does not fit is raised as InsufficientMemoryError, naming the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .offload import move_to_host
from ..planner.memory import CUDA_CONTEXT, Calibration
from ..planner.plan import Plan, plan
from ..planner.units import GiB
from ..planner.rss import available_memory, current_rss


class InsufficientMemoryError(MemoryError):
    """The planner predicts the call does not fit the device or host memory; raised before any work."""


@dataclass(frozen=True)
class OffloadSettings:
    """convert(kv_offload=True, ...)'s choices."""

    resident_layers: int | None    # fixed count of leading layers kept on the device (None: planned)


@dataclass(frozen=True)
class PromptCall:
    """What the planner needs of one prompt call besides the model and its cache."""

    batch: int
    past: int                      # positions cached before the call
    seq_len: int                   # new positions
    dtype: torch.dtype
    device: torch.device
    last_layer_block: bool = False  # the last layer computes every row (loss, hidden states, all logits)
    logits_rows: int = 1           # rows of logits the call returns
    log_probs: bool = False        # the call ends in token log-probabilities (token_logprobs)
    kv_compression_ratio: float | None = None  # encoded host KV: the planned raw / stored ratio (margined)


def _device_budget(memory_budget: int | None, device: torch.device, weight_bytes: int, cache_bytes: int) -> int:
    """Device bytes the plan may fill (weights included). Tensors the caller holds besides the model and
    this cache are taken off; the cache's own buffers count as free, since the plan re-places them."""
    free, _total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    others = max(0, torch.cuda.memory_allocated(device) - weight_bytes - cache_bytes)
    usable = free + reserved + CUDA_CONTEXT - others
    return usable if memory_budget is None else min(memory_budget, usable)


def _weight_bytes(model, device: torch.device) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)


def plan_prompt(model, call: PromptCall, cache, *, chunk_size: int | None, memory_budget: int | None,
                offload: OffloadSettings | None = None, calibration: Calibration | None = None) -> Plan:
    """The plan of one prompt on the memory there now: chunk schedule (``chunk_size`` None) or the
    given chunk, with KV offload the placement. ``memory_budget``: bytes (device; on the CPU the
    process's RSS), None for what the device / host has. Raises InsufficientMemoryError when nothing
    fits and a budget was given or KV offload is on; otherwise the plan says so (``fits``)."""
    device = call.device
    weight_bytes = _weight_bytes(model, device)
    cache_bytes, capacity = cache.device_kv()
    end = call.past + call.seq_len
    common = dict(batch=call.batch, dtype=call.dtype, chunk_size=chunk_size, past=call.past,
                  past_capacity=max(capacity, call.past), calibration=calibration,
                  last_layer_block=call.last_layer_block, logits_rows=call.logits_rows, log_probs=call.log_probs)
    if device.type == "cuda":
        budget = _device_budget(memory_budget, device, weight_bytes, cache_bytes)
        host = available_memory()
        if offload is not None:
            host += cache.host.spare_bytes() + cache.host_kv_bytes()
        p = plan(model.config, call.seq_len, device_memory=budget, host_memory=host,
                 allow_offload=offload is not None,
                 cpu_attention=getattr(cache.host, "cpu_share", None) is not None,
                 resident_layers=offload.resident_layers if offload is not None else None,
                 kv_compression_ratio=call.kv_compression_ratio if offload is not None else None, **common)
        where = f"(device budget {budget / GiB:.2f} GiB, host available {host / GiB:.2f} GiB)"
    else:
        rss = current_rss()
        budget = rss + available_memory() if memory_budget is None else memory_budget
        # what this process holds besides the weights and this cache (which the plan counts itself)
        baseline = max(0, rss - weight_bytes - cache_bytes)
        p = plan(model.config, call.seq_len, device="cpu", device_memory=budget, process_baseline=baseline,
                 allow_offload=False, **common)
        where = f"(RSS budget {budget / GiB:.2f} GiB, resident now {rss / GiB:.2f} GiB)"
    if not p.fits and (memory_budget is not None or offload is not None):
        raise InsufficientMemoryError(f"chunkinfer: {end:,} cached tokens x batch {call.batch} do not fit: "
                                      f"{p.reason} {where}")
    return p


def place(cache, settings: OffloadSettings, p: Plan | None) -> None:
    """Move the layers the plan puts on the host there (a layer never moves back)."""
    n_layers = len(cache.layers)
    if p is not None:
        streamed_plan = p.encoded_device_layers + p.host_layers
        n_resident = streamed_plan[0] if streamed_plan else n_layers  # rings stay resident past it
        on_device = p.encoded_device_layers[-1] + 1 - n_resident if p.encoded_device_layers else 0
    else:
        n_resident = n_layers if settings.resident_layers is None else settings.resident_layers
        compression = cache.host.compression if cache.host is not None else None
        on_device = compression.device_layers if compression is not None else 0
    streamed = cache.streamed_layers()
    if streamed:
        n_resident = min(n_resident, streamed[0])
    if n_resident < n_layers:
        move_to_host(cache, n_resident, on_device)
