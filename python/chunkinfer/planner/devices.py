"""plan_devices(): each device's predicted peak memory for a model spread over devices by a device map.

The planner's per-part memory model (memory.py), applied to what each device holds and runs: the weights placed there, the
residual stream (it moves whole from device to device, so every device running layers holds one
copy), the K, V of the layers it runs, their chunk work buffers, and, on CUDA devices, the fixed
runtime allocations and the allocator margin. The device map reads as accelerate reads it: entries
on "cpu" / "disk" are offloaded when the map has a GPU (they run on the main device, their weights
loaded there one layer at a time), and run on the CPU when it has none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .memory import RUNTIME_FIXED, kv_capacity, slack, work_bytes
from .schedule import chunk_candidates
from .shape import Shape, load_config
from .units import GiB, dtype_name, parse_dtype, parse_memory, positive_int

_OFFLOAD_TARGETS = ("cpu", "disk")


def device_name(device) -> str:
    """"cuda:N", "cpu" or "disk" from an int (a CUDA ordinal, as accelerate writes it), a string or a
    torch.device."""
    if isinstance(device, bool):
        raise TypeError(f"a device must be an int, a string or a torch.device, got {device!r}")
    if isinstance(device, int):
        return f"cuda:{device}"
    if device == "disk":
        return "disk"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: expected 'cuda:N', an int, 'cpu' or 'disk'") from exc
    if d.type == "cuda":
        return f"cuda:{d.index or 0}"
    if d.type == "cpu":
        return "cpu"
    raise ValueError(f"unsupported device {device!r}: chunkinfer plans 'cuda:N', 'cpu' and 'disk'")


def split_layers(config, layers_per_device: dict) -> dict[str, str]:
    """An accelerate device map (for ``from_pretrained(device_map=...)`` / ``dispatch_model``) putting
    the decoder layers on the devices in order, as many on each as ``layers_per_device`` says (e.g.
    ``{0: 16, 1: 16}``); the embedding goes with the first layers, the final norm and the LM head
    with the last (with tied embeddings the LM head stays with the embedding, which holds its weight)."""
    config = load_config(config)
    n = config.num_hidden_layers
    counts = {device_name(d): positive_int(c, f"layers on {d}", minimum=0) for d, c in layers_per_device.items()}
    if sum(counts.values()) != n:
        raise ValueError(f"layers_per_device places {sum(counts.values())} layers; the model has {n}")
    used = [d for d, c in counts.items() if c]
    first, last = used[0], used[-1]
    dmap = {"model.embed_tokens": first, "model.rotary_emb": first}
    i = 0
    for dev, c in counts.items():
        for _ in range(c):
            dmap[f"model.layers.{i}"] = dev
            i += 1
    dmap["model.norm"] = last
    dmap["lm_head"] = first if getattr(config, "tie_word_embeddings", False) else last
    return dmap


@dataclass
class DeviceLoad:
    """What one device holds at its predicted peak."""

    device: str
    layers: list[int]              # decoder layers that run here
    parts: dict[str, int]          # predicted peak bytes by part
    budget: int | None             # bytes it may use (None: not checked)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def peak_alloc_beyond_weights(self) -> int:
        """What torch.cuda.max_memory_allocated(device) minus the weights there should read after the run."""
        return sum(v for k, v in self.parts.items() if k not in ("weights", "allocator margin"))

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget


@dataclass
class DevicePlan:
    model_type: str
    seq_len: int
    batch: int
    dtype: str
    chunk_size: int | None         # None: no chunk size fits every budget (breakdown for breakdown_chunk)
    breakdown_chunk: int
    kv_capacity: int               # positions per layer buffer
    main_device: str               # where accelerate runs offloaded parts
    devices: list[DeviceLoad]
    fits: bool
    reason: str
    notes: list[str] = field(default_factory=list)

    def load(self, device) -> DeviceLoad:
        name = device_name(device)
        for d in self.devices:
            if d.device == name:
                return d
        raise KeyError(f"{name} holds nothing in this plan (devices: {', '.join(d.device for d in self.devices)})")

    def table(self) -> str:
        lines = [f"chunkinfer device plan: {self.model_type}, {self.seq_len:,} tokens x batch {self.batch}, "
                 f"{self.dtype}, " + (f"chunk size {self.chunk_size}" if self.chunk_size else
                                      f"no chunk size fits (shown: chunk {self.breakdown_chunk})")
                 + f", KV capacity {self.kv_capacity:,} positions/layer"]
        for d in self.devices:
            if not d.layers:
                span = "no layers"
            elif d.layers == list(range(d.layers[0], d.layers[-1] + 1)):
                span = f"layers {d.layers[0]}-{d.layers[-1]}"
            else:
                span = f"{len(d.layers)} layers"
            lines += ["", f"{f'{d.device} ({span})':<34}{'GiB':>10}"]
            lines += [f"  {k:<32}{v / GiB:10.2f}" for k, v in d.parts.items()]
            lines.append(f"  {'peak':<32}{d.peak / GiB:10.2f}")
            if d.budget is not None:
                lines.append(f"  {'budget':<32}{d.budget / GiB:10.2f}  {'fits' if d.fits else 'does NOT fit'}")
        lines += ["", f"fits: {'yes' if self.fits else 'no'}" + ("" if self.fits else f": {self.reason}")]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _placement(device_map: dict, names: list[str]) -> dict[str, str]:
    """Each part's device: the longest device-map key equal to it or a prefix of it (accelerate's rule)."""
    if not isinstance(device_map, dict) or not device_map:
        raise TypeError(f"device_map must be a non-empty dict of module name -> device, got {device_map!r}")
    dmap = {str(k): device_name(v) for k, v in device_map.items()}
    for key in dmap:
        for name in names:
            if name.startswith("model.layers.") and key.startswith(name + "."):
                raise ValueError(f"device_map entry {key!r} is inside decoder layer {name}: chunkinfer runs each "
                                 "decoder layer on one device, so the map must keep decoder layers whole")
    out = {}
    for name in names:
        keys = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
        if not keys:
            raise ValueError(f"device_map does not place {name}")
        out[name] = dmap[max(keys, key=len)]
    return out


def plan_devices(config, seq_len: int, device_map: dict, *, budgets: dict | None = None, batch: int = 1,
                 dtype=torch.bfloat16, decode_tokens: int = 0, chunk_size: int | None = None,
                 main_device=None) -> DevicePlan:
    """Predict each device's peak memory for a prefill of ``seq_len`` tokens (plus ``decode_tokens``)
    of a model placed by ``device_map`` (accelerate's form: module name -> device; see split_layers).
    ``budgets``: device -> bytes or a string like "139GiB", for the devices to check. The chunk size
    is the largest that fits every budget unless ``chunk_size`` fixes it. ``main_device``: where
    accelerate runs offloaded parts (default: the first GPU of the map, as dispatch_model picks)."""
    seq_len = positive_int(seq_len, "seq_len")
    batch = positive_int(batch, "batch")
    decode_tokens = positive_int(decode_tokens, "decode_tokens", minimum=0)
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    dt = parse_dtype(dtype)
    elt = torch.empty((), dtype=dt).element_size()
    config = load_config(config)
    shape = Shape.from_config(config)
    L = shape.layers
    layer_names = [f"model.layers.{i}" for i in range(L)]
    where = _placement(device_map, ["model.embed_tokens", *layer_names, "model.norm", "lm_head"])
    gpus = [d for d in dict.fromkeys(where.values()) if d not in _OFFLOAD_TARGETS]
    main = device_name(main_device) if main_device is not None else (gpus[0] if gpus else "cpu")
    offloaded = set(_OFFLOAD_TARGETS) - {main} if main != "cpu" else {"disk"}
    run_on = {name: main if dev in offloaded else dev for name, dev in where.items()}
    budgets = {device_name(d): parse_memory(v, f"budget of {d}") for d, v in (budgets or {}).items()}
    unused = sorted(set(budgets) - set(run_on.values()) - set(where.values()))
    if unused:
        raise ValueError(f"budgets name {', '.join(unused)}, which the device map does not use")

    emb = shape.vocab * shape.hidden * elt
    layer_weights = (shape.weight_params() - shape.vocab * shape.hidden * (1 if shape.tied else 2)
                     - shape.hidden) // L * elt
    sizes = {"model.embed_tokens": emb, "model.norm": shape.hidden * elt, "lm_head": emb,
             **{n: layer_weights for n in layer_names}}
    if shape.tied and where["lm_head"] == where["model.embed_tokens"]:
        sizes["lm_head"] = 0  # one tensor with the embedding
    residual = batch * seq_len * shape.hidden * elt + 2 * batch * seq_len * 8
    cap, prev_cap = kv_capacity(seq_len, decode_tokens)
    layer_kv = batch * cap * shape.kv_bytes_per_token_layer(elt)
    growth_kv = batch * prev_cap * shape.kv_bytes_per_token_layer(elt) if cap != prev_cap else 0

    devices = list(dict.fromkeys([*run_on.values(), *(d for d in where.values() if d != "disk")]))

    def load(dev: str, rows: int) -> DeviceLoad:
        layers = [i for i, n in enumerate(layer_names) if run_on[n] == dev]
        weights = sum(sizes[n] for n, d in where.items() if d == dev and (d not in offloaded or d == "cpu"))
        parts = {"weights": weights}
        if dev == main:
            onloaded = [sizes[n] for n, d in where.items() if d in offloaded]
            if onloaded:  # offloaded parts are loaded here one at a time
                parts["offloaded part loaded"] = max(onloaded)
        if layers or run_on["model.embed_tokens"] == dev:
            parts["residual stream"] = residual
        if layers:
            parts["KV resident"] = len(layers) * layer_kv + growth_kv
            w = work_bytes(shape, rows, batch, elt)
            # the last layer's own KV is allocated while only its K, V-only work is alive (plan.py)
            last_kv = layer_kv if L - 1 in layers else 0
            parts["chunk work buffers"] = w.activation + (max(w.block - last_kv, w.kv_only) if L > 1
                                                          else max(w.block, w.kv_only))
        elif run_on["lm_head"] == dev:
            parts["LM head rows and logits"] = batch * (rows * shape.hidden + shape.vocab) * elt
        if dev.startswith("cuda"):
            parts["runtime fixed"] = RUNTIME_FIXED
            parts["allocator margin"] = slack(sum(parts.values()) - weights)
        return DeviceLoad(device=dev, layers=layers, parts=parts, budget=budgets.get(dev))

    def loads(c: int) -> list[DeviceLoad]:
        return [load(d, min(c, seq_len)) for d in devices]

    candidates = [chunk_size] if chunk_size is not None else chunk_candidates(seq_len)
    chosen = next((c for c in candidates if all(x.fits is not False for x in loads(c))), None)
    shown = chosen if chosen is not None else candidates[-1]
    result = loads(shown)
    over = [x for x in result if x.fits is False]
    reason = "; ".join(f"{x.device} needs {x.peak / GiB:.2f} GiB, budget {x.budget / GiB:.2f} GiB" for x in over)
    notes = [f"{d} has no budget: not checked" for d in devices if d not in budgets]
    if any(d in offloaded for d in where.values()):
        notes.append(f"parts mapped to {' / '.join(sorted(offloaded))} run on {main}, their weights loaded there "
                     "one decoder layer at a time (accelerate offload)")
    return DevicePlan(model_type=shape.model_type, seq_len=seq_len, batch=batch, dtype=dtype_name(dt),
                      chunk_size=chosen, breakdown_chunk=shown, kv_capacity=cap, main_device=main, devices=result,
                      fits=not over, reason=reason, notes=notes)
