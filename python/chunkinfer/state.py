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


@dataclass(frozen=True)
class ConvertSettings:
    """convert()'s arguments as given: what a pickled converted model carries to rebuild its state."""

    chunk_size: int | None
    cuda_graphs: bool
    kv_offload: bool
    memory_budget: object
    resident_layers: int | None
    cpu_attention: object
    progress: object | None
    kv_compression: object = None

    def as_args(self) -> tuple:
        return (self.chunk_size, self.cuda_graphs, self.kv_offload, self.memory_budget, self.resident_layers,
                self.progress, self.cpu_attention, self.kv_compression)


@dataclass
class ConvertedState:
    """What convert() attaches to a model (as ``model._chunkinfer``). Pickled, only its settings travel
    (``binding`` is then None until the converted forward rebuilds it)."""

    settings: ConvertSettings
    binding: ModelBinding | None
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

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "replaced": self.replaced}

    def __setstate__(self, state: dict) -> None:
        self.__init__(settings=state["settings"], binding=None, chunk_size=0, signature=None)
        self.replaced = state["replaced"]
