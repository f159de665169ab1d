"""Where each part of a model runs: plain placement, accelerate device maps and accelerate's offload hooks.

A model dispatched by accelerate (``from_pretrained(device_map=...)``, ``dispatch_model``) carries an
``AlignDevicesHook`` on its modules (``module._hf_hook``). The layer loop reads weights directly
instead of calling the modules, so it does here what the hooks would do: each decoder layer runs on
the device its weights are on (for weights accelerate offloaded to cpu / disk, the hook's execution
device), and offloaded weights are loaded by the layer's own hooks for the time the layer computes,
once per call rather than once per chunk. Accelerate is not imported: hooks are recognised by the
attributes they have (``offload``, ``execution_device``, ``pre_forward`` / ``post_forward``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

_NOTHING = contextlib.nullcontext()


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks on ``module`` (a SequentialHook's parts, flattened)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _as_device(device) -> torch.device:
    d = torch.device(device)  # ints are CUDA ordinals, as accelerate uses them
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _execution_device(module: nn.Module) -> torch.device | None:
    for hook in _hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def moves_inputs(module: nn.Module) -> bool:
    """Whether calling ``module`` moves its inputs to its execution device (an accelerate hook)."""
    return _execution_device(module) is not None


def unhooked(module: nn.Module):
    """``module``'s forward without accelerate's hook, which would move the inputs to the module's
    device: the rotary embedding is computed where its input is (the layer's device) instead."""
    return getattr(module, "_old_forward", module)


class _Onloaded:
    """Offloaded weights loaded onto their execution device by their own hooks for the block's time."""

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs

    def __enter__(self) -> None:
        done = []
        try:
            for module, hook in self.pairs:
                hook.pre_forward(module)
                done.append((module, hook))
        except BaseException:
            for module, hook in reversed(done):
                hook.post_forward(module, None)
            raise

    def __exit__(self, *exc) -> None:
        for module, hook in reversed(self.pairs):
            hook.post_forward(module, None)


def _live_device(probe: torch.Tensor, hook_device: torch.device | None) -> torch.device:
    return probe.device if hook_device is None or probe.device.type != "meta" else hook_device


@dataclass
class ModelDevices:
    """Where the parts of one model run. Read from the weights at each call (so ``model.to(...)`` after
    conversion is followed); what accelerate's hooks say is resolved once, when the model is bound."""

    probes: list                      # per decoder layer: one of its weights
    layer_hook_devices: list          # per decoder layer: its offload hooks' execution device, or None
    embed_module: nn.Module
    final_norm_module: nn.Module
    head_module: nn.Module
    offloaded: dict = field(default_factory=dict)  # layer index or "final_norm" -> [(module, hook)] to onload
    norm_hook_device: torch.device | None = None

    @property
    def layers(self) -> list[torch.device]:
        """Where each decoder layer runs: its weights' device (offloaded: its hooks' execution device)."""
        return [_live_device(p, h) for p, h in zip(self.probes, self.layer_hook_devices)]

    @property
    def embed(self) -> torch.device:
        """The embedding's output device: where the residual stream starts."""
        return _module_device(self.embed_module)

    @property
    def head(self) -> torch.device:
        """Where the final norm and the LM head run (the LM head's device)."""
        return _module_device(self.head_module)

    @property
    def final_norm(self) -> torch.device:
        return _live_device(self.final_norm_module.weight, self.norm_hook_device)

    @property
    def single(self) -> bool:
        """Everything on one device, no weight offloaded."""
        if self.offloaded:
            return False
        first = self.probes[0].device
        return (all(p.device == first for p in self.probes) and self.embed == first and self.head == first
                and self.final_norm == first)

    @property
    def main(self) -> torch.device:
        """The device that picks defaults (chunk size): the first CUDA device a layer runs on."""
        layers = self.layers
        return next((d for d in layers if d.type == "cuda"), layers[0])

    def onloaded(self, part) -> contextlib.AbstractContextManager:
        """Context in which ``part``'s (a layer index or "final_norm") offloaded weights are loaded."""
        pairs = self.offloaded.get(part)
        return _Onloaded(pairs) if pairs else _NOTHING

    def describe(self) -> str:
        """Layer ranges per device, e.g. "layers 0-15 on cuda:0, 16-31 on cuda:1"."""
        layers = self.layers
        runs, start = [], 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or layers[i] != layers[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span} on {layers[start]}")
                start = i
        return "layers " + ", ".join(runs)


def _module_device(module: nn.Module) -> torch.device:
    """Where calling ``module`` computes: its hook's execution device, else its weight's device."""
    dev = _execution_device(module) if hasattr(module, "_hf_hook") else None
    return dev if dev is not None else module.weight.device


def _offload_hooks(model: nn.Module) -> list[tuple[str, nn.Module, object, set[int]]]:
    """(name, module, hook, ids of the parameters it loads) for every offloading hook in the model."""
    out = []
    for name, module in model.named_modules():
        for hook in _hooks(module):
            if getattr(hook, "offload", False):
                recurse = bool(getattr(hook, "place_submodules", False))
                covered = {id(p) for p in module.parameters(recurse=recurse)}
                out.append((name, module, hook, covered))
    return out


def _param_device(params: list[torch.Tensor]) -> set[torch.device]:
    return {p.device for p in params if p.device.type != "meta"}


def resolve_devices(model: nn.Module, layers: list[nn.Module], embed: nn.Module, final_norm: nn.Module,
                    lm_head: nn.Module) -> ModelDevices:
    """Where each part of ``model`` runs. Raises ValueError, naming the module, for placements the
    layer loop cannot run: a decoder layer split over devices, meta parameters no hook loads, or
    offloaded weights loaded by a hook above the decoder layers."""
    hooks = _offload_hooks(model)
    covered = set().union(*(c for *_, c in hooks)) if hooks else set()
    for name, p in model.named_parameters():
        if p.device.type == "meta" and id(p) not in covered:
            raise ValueError(f"chunkinfer.convert: parameter {name} is on the meta device and no accelerate "
                             "offload hook loads it (an unloaded or half-dispatched model?)")

    owner: dict[int, object] = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    owner.update({id(m): "final_norm" for m in final_norm.modules()})
    called = {id(m) for part in (embed, lm_head) for m in part.modules()}  # called as modules: own hooks load
    offloaded: dict = {}
    hook_devices: dict = {}
    for name, module, hook, params in hooks:
        if id(module) in called or not params:  # no parameters (the rotary's buffers): nothing we read
            continue
        part = owner.get(id(module))
        if part is None:
            raise ValueError(
                f"chunkinfer.convert: the accelerate hook on {name or 'the model'!r} offloads weights of several "
                "decoder layers at once; chunkinfer loads offloaded weights one decoder layer at a time: dispatch "
                "with a device map whose entries are whole decoder layers (or smaller)")
        offloaded.setdefault(part, []).append((module, hook))
        hook_devices.setdefault(part, set()).add(_as_device(hook.execution_device))

    layer_hook_devices = []
    for i, layer in enumerate(layers):
        params = list(layer.parameters())
        found = _param_device(params) | hook_devices.get(i, set())
        if len(found) != 1:
            raise ValueError(
                f"chunkinfer.convert: decoder layer {i} has weights on {sorted(map(str, found))}; chunkinfer runs "
                "each decoder layer on one device: use a device map that keeps decoder layers whole "
                "(accelerate's no_split_module_classes / the model's _no_split_modules)")
        layer_hook_devices.append(next(iter(hook_devices[i])) if i in hook_devices else None)
    norm_hook = hook_devices.get("final_norm")
    return ModelDevices(probes=[next(layer.parameters()) for layer in layers], layer_hook_devices=layer_hook_devices,
                        embed_module=embed, final_norm_module=final_norm, head_module=lm_head, offloaded=offloaded,
                        norm_hook_device=next(iter(norm_hook)) if norm_hook else None)
