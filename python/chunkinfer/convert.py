"""convert() / revert(): swap a Hugging Face causal LM's forward for chunkinfer's, and back."""
from __future__ import annotations

import inspect
import warnings

import torch
import transformers
from packaging import version
from torch import nn

from .forward import converted_forward
from .kv.encoded import parse_kv_compression
from .kv.host_attention import parse_cpu_attention
from .kv.placement import OffloadSettings
from .models.adapters import bind
from .ops.kv_codec import DTYPES as KV_CODEC_DTYPES
from .planner.schedule import default_chunk_size
from .planner.units import parse_memory
from .state import ConvertSettings, ConvertedState

TRANSFORMERS_TESTED = ("5.17.0", "5.25.0")  # the oldest and newest releases CI runs the suite against


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _memory_budget(memory_budget) -> int | None:
    if memory_budget is None or (isinstance(memory_budget, str) and memory_budget == "auto"):
        return None
    return parse_memory(memory_budget, "memory_budget")


def _offload_settings(kv_offload, budget: int | None, resident_layers, n_layers: int) -> OffloadSettings | None:
    if not isinstance(kv_offload, bool):
        raise TypeError(f"kv_offload must be a bool, got {type(kv_offload).__name__}")
    if resident_layers is not None:
        if isinstance(resident_layers, bool) or not isinstance(resident_layers, int):
            raise TypeError(f"resident_layers must be an int, got {type(resident_layers).__name__}")
        if not 0 <= resident_layers <= n_layers:
            raise ValueError(f"resident_layers must be in [0, {n_layers}] (the model's layers), got {resident_layers}")
    if not kv_offload:
        if resident_layers is not None:
            raise ValueError("resident_layers places KV for offload: pass kv_offload=True too")
        return None
    from .kv import transfer

    transfer.require()
    return OffloadSettings(resident_layers=resident_layers)


def build_state(model: nn.Module, chunk_size: int | None = None, cuda_graphs: bool = True, kv_offload: bool = False,
                memory_budget="auto", resident_layers: int | None = None, progress=None,
                cpu_attention="auto", kv_compression=None) -> ConvertedState:
    """Validate a model and resolve everything the loop needs, without changing the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"chunkinfer.convert expects a transformers model, got {type(model).__name__}")
    check_chunk_size(chunk_size)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (done, total) or None, got {type(progress).__name__}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
    binding = bind(model)
    if kv_offload is True and not binding.devices.single:
        raise ValueError(f"chunkinfer.convert: kv_offload=True needs the whole model on one device with no "
                         f"offloaded weights; this one runs {binding.devices.describe()}"
                         + (" with accelerate-offloaded weights" if binding.devices.offloaded else ""))
    budget = _memory_budget(memory_budget)
    offload = _offload_settings(kv_offload, budget, resident_layers, len(binding.layers))
    cpu_share = parse_cpu_attention(cpu_attention)
    if cpu_share is not None and cpu_attention != "auto" and offload is None:
        raise ValueError(f"cpu_attention={cpu_attention!r} splits the decode over host-resident KV: pass "
                         f"kv_offload=True too (without it every layer's KV stays on the device)")
    compression = parse_kv_compression(kv_compression)
    if compression is not None:
        if offload is None:
            raise ValueError(f"kv_compression={kv_compression!r} compresses the KV of host-resident layers: pass "
                             "kv_offload=True too (device-resident KV is kept raw)")
        dtype = binding.embed.weight.dtype
        if dtype not in KV_CODEC_DTYPES:
            raise ValueError(f"kv_compression={kv_compression!r} codes bfloat16 / float16 K, V losslessly; this "
                             f"model runs in {dtype}")
    device = binding.devices.main
    host = None
    if offload is not None:
        from .kv.offload import HostKV

        host = HostKV(device, cpu_share, compression)
    settings = ConvertSettings(chunk_size, cuda_graphs, kv_offload, memory_budget, resident_layers, cpu_attention,
                               progress, kv_compression)
    return ConvertedState(settings=settings, binding=binding, chunk_size=chunk_size or default_chunk_size(device),
                          plan_chunks=chunk_size is None, memory_budget=budget, cuda_graphs=cuda_graphs,
                          offload=offload, host=host, progress=progress,
                          signature=inspect.signature(type(model).forward))


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_chunkinfer", None), ConvertedState)


def convert(model: nn.Module, *, chunk_size: int | None = None, cuda_graphs: bool = True, kv_offload: bool = False,
            memory_budget="auto", resident_layers: int | None = None, cpu_attention="auto",
            progress=None, kv_compression=None) -> nn.Module:
    """Make ``model(...)`` and ``model.generate(...)`` run chunkinfer's layer loop; returns the model.

    Everything is validated first; on any error the model is left untouched. Converting a converted
    model again re-binds it (e.g. to change ``chunk_size``; a calibration is dropped).

    ``chunk_size=None``: before each prompt the planner (chunkinfer.plan) picks a chunk per layer
    within ``memory_budget`` ("auto": the memory the device has free for this model, on the CPU
    the RSS the process can reach; or bytes / "80GiB"): the largest power of two in
    ``plan.CHUNK_LIMITS`` (CUDA 1024-8192, CPU 256-1024) whose predicted peak fits, shrinking layer
    by layer as the KV grows. A given ``chunk_size`` is used as is for every layer (with a byte
    budget, a call it does not fit is refused). With "auto", a prompt the plan says does not fit
    runs with the smallest chunk; with a byte budget it raises ``InsufficientMemoryError`` before
    any work. ``cuda_graphs``: on CUDA (fp16/bf16), one-token decode steps replay a captured CUDA
    graph per batch size instead of launching every kernel from Python.

    ``kv_offload=True``: before each prompt the planner places the KV: the leading layers stay on the
    device as far as ``memory_budget`` allows ("auto": the device's memory; or bytes / "80GiB"), the
    rest live in pinned host memory and are streamed through the device, overlapped with compute.
    ``resident_layers`` fixes how many leading layers stay on the device instead. A prompt that cannot
    fit raises ``chunkinfer.InsufficientMemoryError`` before any work, naming the bytes.
    ``cpu_attention`` (with offload): in one-token decode steps the CPU attends the first part of each
    host-resident layer's KV where it lives while the rest crosses PCIe, merged exactly by log-sum-exp;
    "auto" balances the two from measured rates, a float in [0, 1] fixes the CPU's share, False or 0
    streams everything.
    ``kv_compression="lossless"`` (with offload; bfloat16 / float16 models): host-resident layers keep
    their K, V losslessly compressed (ops.kv_encode: each exponent as a 4-bit code of a table calibrated
    per layer, K and V), about 1.2-1.3x fewer bytes to hold and to cross PCIe, decoded bit for bit: the
    outputs equal the uncompressed run's. The planner sizes host KV by the ratio measured on the
    prompt's first layer, with a margin; blocks that code worse spill to a pool that grows.
    ``progress``: called as ``progress(done, total)`` after each chunk of a prompt (layers x chunks),
    e.g. to drive a progress bar over a long prefill.

    Models spread over devices (accelerate's ``from_pretrained(device_map=...)`` / ``dispatch_model``,
    or layers moved by hand): each decoder layer runs on the device its weights are on, with its KV
    there; the residual stream moves once per device boundary. Weights accelerate offloaded to cpu /
    disk are loaded by their hooks once per layer per call. Convert after dispatching; each decoder
    layer must sit on one device. CUDA graphs need the whole model on one device, ``kv_offload`` too.
    """
    check_transformers_version()
    state = build_state(model, chunk_size, cuda_graphs, kv_offload, memory_budget, resident_layers, progress,
                        cpu_attention, kv_compression)
    # Dispatched by accelerate: the model's own hook wraps ``_old_forward`` (moving inputs to the main
    # device and outputs back, as for the stock forward); the converted forward goes in its place.
    slot = "_old_forward" if getattr(model, "_hf_hook", None) is not None and "_old_forward" in vars(model) \
        else "forward"
    state.replaced = model._chunkinfer.replaced if is_converted(model) else (slot, vars(model).get(slot))
    model._chunkinfer = state
    setattr(model, slot, ConvertedForward(model))
    return model


class ConvertedForward:
    """The forward convert() puts on a model: chunkinfer's, with the stock forward's signature and
    documentation (generate() reads them). Picklable, as the model's ConvertedState is: a pickled,
    deep-copied or torch.save'd converted model comes back converted, with the same settings, and
    rebuilds what cannot travel (its binding, graphs, pinned memory) at its first call."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        state: ConvertedState = model._chunkinfer
        if state.binding is None:  # unpickled or copied: bind this model afresh with the same settings
            fresh = build_state(model, *state.settings.as_args())
            fresh.replaced = state.replaced
            model._chunkinfer = fresh
        return converted_forward(model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.model).forward.__get__(self.model))

    @property
    def __doc__(self) -> str | None:  # noqa: D105
        return type(self.model).forward.__doc__

    def __reduce__(self):
        return ConvertedForward, (self.model,)


def check_transformers_version() -> None:
    """Warn when the installed transformers is outside the range chunkinfer is tested against."""
    installed = version.parse(transformers.__version__)
    if not version.parse(TRANSFORMERS_TESTED[0]) <= installed <= version.parse(TRANSFORMERS_TESTED[1]):
        warnings.warn(f"chunkinfer is tested with transformers {TRANSFORMERS_TESTED[0]} to {TRANSFORMERS_TESTED[1]}; "
                      f"{transformers.__version__} is installed. Calls whose semantics it cannot check take the "
                      "stock forward, but other changes may go unnoticed: compare a few outputs with the stock "
                      "model.", stacklevel=3)


def revert(model: nn.Module) -> nn.Module:
    """Undo convert(): the model runs transformers' own forward again."""
    if not is_converted(model):
        raise ValueError("chunkinfer.revert: this model was not converted")
    slot, previous = model._chunkinfer.replaced
    if previous is None:
        delattr(model, slot)
    else:
        setattr(model, slot, previous)
    del model._chunkinfer
    return model
