"""chunkinfer: exact layer-chunked long-context inference for Hugging Face causal LMs."""
from __future__ import annotations

from . import ops
from .adapters import supported_architectures
from .cache import ChunkKVCache
from .calibrate import calibrate
from .convert import convert, is_converted, revert
from .logprobs import token_logprobs
from .ops import build_info
from .placement import InsufficientMemoryError
from .plan import Calibration, Plan, plan

__all__ = ["ops", "build_info", "convert", "revert", "is_converted", "token_logprobs", "ChunkKVCache",
           "supported_architectures", "plan", "Plan", "Calibration", "calibrate", "InsufficientMemoryError"]
__version__ = "0.1.0"
