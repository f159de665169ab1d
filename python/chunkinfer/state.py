"""What convert() attaches to a model (``model._chunkinfer``): its binding and settings, and what it keeps
across calls (captured decode graphs, the host KV engine, the last plan, warnings given)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from .kv.placement import OffloadSettings
from .loop.decode_graph import DecodeGraphs
from .models.adapters import ModelBinding
from .planner.memory import Calibration
from .planner.plan import Plan


@dataclass
class ConvertedState:
    """What convert() attaches to a model (as ``model._chunkinfer``)."""

    binding: ModelBinding
    chunk_size: int                          # the chunk when none is planned (given, or the device default)
    signature: inspect.Signature
    cuda_graphs: bool = True
    plan_chunks: bool = False                # chunk_size=None: the planner's schedule per prompt
    memory_budget: int | None = None         # bytes (device; CPU: process RSS), None: what there is
    offload: OffloadSettings | None = None   # kv_offload=True: placement settings
    calibration: Calibration | None = None   # calibrate(): this model's measured correction
    last_plan: Plan | None = None            # the plan the last prompt ran with (None: not planned)
    progress: object | None = None           # callable(chunks done, chunks in all) for prompts
    host: object | None = None               # kv.offload.HostKV: pinned arena + transfer engine
    graphs: DecodeGraphs = field(default_factory=DecodeGraphs)
    warned: set = field(default_factory=set)
    replaced: tuple = ("forward", None)      # (attribute, what it held) that convert() replaced: revert() restores
