"""convert() / revert(): swap a Hugging Face causal LM's forward for chunkinfer's, and back."""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from .adapters import bind
from .forward import ConvertedState, converted_forward

DEFAULT_CHUNK_SIZE = {"cuda": 8192}
DEFAULT_CHUNK_SIZE_OTHER = 1024


def default_chunk_size(device: torch.device) -> int:
    return DEFAULT_CHUNK_SIZE.get(device.type, DEFAULT_CHUNK_SIZE_OTHER)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def build_state(model: nn.Module, chunk_size: int | None = None, cuda_graphs: bool = True) -> ConvertedState:
    """Validate a model and resolve everything the loop needs, without changing the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"chunkinfer.convert expects a transformers model, got {type(model).__name__}")
    check_chunk_size(chunk_size)
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
    binding = bind(model)
    if chunk_size is None:
        chunk_size = default_chunk_size(binding.embed.weight.device)
    return ConvertedState(binding=binding, chunk_size=chunk_size, cuda_graphs=cuda_graphs,
                          signature=inspect.signature(type(model).forward))


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_chunkinfer", None), ConvertedState)


def convert(model: nn.Module, *, chunk_size: int | None = None, cuda_graphs: bool = True) -> nn.Module:
    """Make ``model(...)`` and ``model.generate(...)`` run chunkinfer's layer loop; returns the model.

    Everything is validated first; on any error the model is left untouched. Converting a converted
    model again re-binds it (e.g. to change ``chunk_size``). Default chunk size: 8192 tokens on CUDA,
    1024 elsewhere. ``cuda_graphs``: on CUDA (fp16/bf16), one-token decode steps replay a captured
    CUDA graph per batch size instead of launching every kernel from Python.
    """
    state = build_state(model, chunk_size, cuda_graphs)
    original = type(model).forward

    def forward(self, *args, **kwargs):
        return converted_forward(self, *args, **kwargs)

    forward.__wrapped__ = original  # inspect.signature (generate's logits_to_keep check) sees the stock one
    forward.__doc__ = original.__doc__
    model._chunkinfer = state
    model.forward = types.MethodType(forward, model)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo convert(): the model runs transformers' own forward again."""
    if not is_converted(model):
        raise ValueError("chunkinfer.revert: this model was not converted")
    del model.forward
    del model._chunkinfer
    return model
