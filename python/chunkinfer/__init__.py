"""chunkinfer: exact layer-chunked long-context inference for Hugging Face causal LMs."""
from __future__ import annotations

from . import ops
from .convert import convert, is_converted, revert
from .kv.cache import ChunkKVCache
from .kv.placement import InsufficientMemoryError
from .logprobs import token_logprobs
from .models.adapters import supported_architectures
from .ops import build_info
from .planner.calibrate import calibrate
from .planner.memory import Calibration
from .planner.plan import Plan, plan

__all__ = ["ops", "build_info", "convert", "revert", "is_converted", "token_logprobs", "ChunkKVCache",
           "supported_architectures", "plan", "Plan", "Calibration", "calibrate", "InsufficientMemoryError"]
__version__ = "0.1.0"
