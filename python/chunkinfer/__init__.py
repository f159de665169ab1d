"""chunkinfer: exact layer-chunked long-context inference for Hugging Face causal LMs."""
from __future__ import annotations

from . import ops
from .ops import build_info

__all__ = ["ops", "build_info"]
__version__ = "0.1.0"
