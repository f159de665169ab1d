"""The forward a converted model runs: the call read once, its path chosen once.

  step     1 to STEP_TOKENS new tokens per sequence on a non-empty cache: the decode kernels
           (loop/step.py), graph-captured where they can be (loop/decode_graph.py)
  prompt   everything else the loop handles: the chunked prefill (loop/prefill.py); with integer
           ``logits_to_keep`` = k >= 2, the rows after the first kept one run as a step (so that a
           verification appended to a prompt, as assisted generation's first call is, computes each
           of them as plain decoding would)
  stock    what the loop does not handle (autograd, dropout in training, attention weights, masks the
           kernels cannot express, other cache types, float64): transformers' own forward, warned
           once per reason. Never an assumption about the inputs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kv.cache import ChunkKVCache
from .kv.device_layer import ChunkKVLayer
from .kv.encoded import measured_ratio
from .kv.placement import PromptCall, place, plan_prompt
from .loop.head import final_norm, head_chunk_rows, iter_logits, logits_of
from .loop.loss import ChunkedCrossEntropy, shifted_targets
from .loop.prefill import LoopInputs, run_layers, sample_kv
from .loop.step import STEP_TOKENS
from .loop.step_path import run_step
from .models.devices import moves_inputs
from .ops.kv_codec import DTYPES as KV_CODEC_DTYPES
from .planner.schedule import CHUNK_LIMITS
from .state import ConvertedState

LOOP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# forward arguments the loop reads; anything else (a flag of a newer transformers, a model-specific input)
# runs the stock forward
_READ = frozenset({"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache", "past_key_values",
                   "use_cache", "labels", "logits_to_keep", "return_dict", "output_attentions", "output_hidden_states",
                   "num_items_in_batch", "shift_labels", "cache_position"})
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NotOnLoop(Exception):
    """The loop does not handle this call (the converted forward runs the stock one instead)."""


@dataclass
class Call:
    """One forward call's arguments, by name (whether given by position or keyword)."""

    args: dict
    cache_name: str                  # the name the cache came under ("cache" or "past_key_values")
    unknown: list = field(default_factory=list)

    def get(self, name: str, default=None):
        return self.args.get(name, default)

    @property
    def cache(self):
        return self.args.get(self.cache_name)


def read_call(state: ConvertedState, model, args: tuple, kwargs: dict) -> Call:
    """The call's arguments by name: keywords as they are (the common case, generate()'s), positional
    ones bound to the stock signature. Both of transformers' names for the cache are read."""
    if args:
        bound = state.signature.bind(model, *args, **kwargs)
        a = dict(bound.arguments)
        a.pop("self", None)
        a.update(a.pop("kwargs", None) or {})
    else:
        a = kwargs
    if "cache" in a and "past_key_values" in a and a["cache"] is not None and a["past_key_values"] is not None:
        raise ValueError("You cannot specify both `cache` and `past_key_values`. use `cache` only.")
    name = "cache" if a.get("cache") is not None or "past_key_values" not in a else "past_key_values"
    return Call(a, name, [k for k in a if k not in _READ])


def _warn_once(state: ConvertedState, reason: str) -> None:
    if reason not in state.warned:
        state.warned.add(reason)
        warnings.warn(f"chunkinfer: {reason}; running the stock transformers forward for such calls", stacklevel=4)


def dropout_in_use(model) -> bool:
    """Whether stock's forward would apply dropout: training mode and any dropout probability > 0 (a
    Dropout module, or the attention's functional dropout read from the config)."""
    if not model.training:
        return False
    config = model.config
    if any(float(getattr(config, n, 0.0) or 0.0) > 0 for n in ("attention_dropout", "attn_pdrop", "dropout")):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def stock_reason(model, state: ConvertedState, call: Call) -> str | None:
    """Why this call must run the stock forward, or None when the loop runs it."""
    if torch.is_grad_enabled():
        emb = call.get("inputs_embeds")
        if (emb is not None and emb.requires_grad) or any(p.requires_grad for p in model.parameters()):
            return ("autograd is recording (training, or inference outside torch.no_grad()); wrap inference in "
                    "torch.no_grad() or torch.inference_mode() to run chunkinfer's loop")
    if call.unknown:
        return f"unsupported forward arguments {sorted(call.unknown)}"
    if dropout_in_use(model):
        return "training mode with dropout (call model.eval() to run chunkinfer's loop)"
    oa = call.get("output_attentions")
    if oa or (oa is None and getattr(model.config, "output_attentions", False)):
        return "output_attentions=True (attention weights are never formed by the loop)"
    ohs = call.get("output_hidden_states")
    if ohs is not None and not isinstance(ohs, bool):
        return "output_hidden_states given as layer indices"
    if state.binding.embed.weight.dtype not in LOOP_DTYPES:
        return f"weights in {state.binding.embed.weight.dtype} (the loop's kernels take float32, float16, bfloat16)"
    mask = call.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
        return "attention_mask that is not a 2-D padding mask"
    ltk = call.get("logits_to_keep", 0)
    if torch.is_tensor(ltk) and ltk.dim() != 1:
        return "logits_to_keep given as a 2-D tensor"
    cache = call.cache
    if cache is not None and not isinstance(cache, DynamicCache):
        return f"a cache of type {type(cache).__name__} (chunkinfer continues DynamicCache and its own)"
    return None


def check_inputs(model, a: dict, past: int) -> tuple[int, int]:
    """Raise ValueError/TypeError on malformed inputs, before any work. Returns (B, S)."""
    ids, emb = a.get("input_ids"), a.get("inputs_embeds")
    if (ids is None) == (emb is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if ids is not None:
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be a 2-D integer tensor [batch, seq], got "
                             f"{getattr(ids, 'shape', type(ids))}")
        b, s = ids.shape
    else:
        hidden = model.config.hidden_size
        if not torch.is_tensor(emb) or emb.dim() != 3 or emb.shape[-1] != hidden:
            raise ValueError(f"inputs_embeds must be [batch, seq, {hidden}], got {getattr(emb, 'shape', type(emb))}")
        b, s = emb.shape[:2]
    if s == 0 or b == 0:
        raise ValueError(f"empty input (batch {b}, sequence {s})")
    embed = model.model.embed_tokens
    x = ids if ids is not None else emb
    if x.device != embed.weight.device and not moves_inputs(embed):  # accelerate's hooks move inputs
        raise ValueError(f"inputs are on {x.device} but the model is on {embed.weight.device}")
    mask = a.get("attention_mask")
    if mask is not None and tuple(mask.shape) != (b, past + s):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected (batch, past + seq) = "
                         f"({b}, {past + s})")
    pos = a.get("position_ids")
    if pos is not None and (pos.dim() != 2 or pos.shape[1] != s or pos.shape[0] not in (1, b)):
        raise ValueError(f"position_ids has shape {tuple(pos.shape)}, expected ({b} or 1, {s})")
    labels = a.get("labels")
    if labels is not None and tuple(labels.shape) != (b, s):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({b}, {s})")
    ltk = a.get("logits_to_keep", 0)
    if torch.is_tensor(ltk):
        if ltk.dtype.is_floating_point or ltk.dtype == torch.bool:
            raise ValueError("logits_to_keep as a tensor must hold integer positions")
    elif not isinstance(ltk, int) or isinstance(ltk, bool) or ltk < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D tensor of positions, got {ltk!r}")
    if labels is not None:
        kept = len(ltk) if torch.is_tensor(ltk) else (s if ltk == 0 else min(ltk, s))
        if kept != s:  # stock computes the loss over the kept logits against every label, and fails so
            raise ValueError(f"Expected input batch_size ({b * kept}) to match target batch_size ({b * s}).")
    return b, s


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_cache(cache: ChunkKVCache, state: ConvertedState, batch: int) -> None:
    """A cache another model, dtype, device or batch filled: ValueError before any work."""
    mb = state.binding
    if len(cache.layers) != len(mb.layers):
        raise ValueError(f"the cache passed has {len(cache.layers)} layers, the model has {len(mb.layers)}")
    held = cache.batch_size_held()
    if held is not None and held != batch:
        raise ValueError(f"the cache passed holds batch {held}, the input has batch {batch}")
    if cache.filled_by is mb:  # this model filled it: its shapes were checked (a step's host time counts)
        return
    for li, (layer, lb) in enumerate(zip(cache.layers, mb.layers)):
        if (shape := layer.held_shape()) is None:
            continue
        _, h, d, held_dtype = shape
        where = f" on {layer.k_buf.device}" if isinstance(layer, ChunkKVLayer) else " (streamed)"
        dtype, device = lb.o_proj.weight.dtype, mb.devices.layers[li]  # where the layer runs (accelerate)
        if (h, d) != (lb.n_kv, lb.head_dim) or held_dtype != dtype or (
                isinstance(layer, ChunkKVLayer) and not _same_device(layer.k_buf.device, device)):
            raise ValueError(f"the cache passed was filled by another model: layer {li} holds {h} KV heads of "
                             f"dim {d} in {held_dtype}{where}, the model has {lb.n_kv} of "
                             f"dim {lb.head_dim} in {dtype} on {device}")


def take_cache(call: Call, state: ConvertedState, batch: int) -> ChunkKVCache:
    """The ChunkKVCache this call continues: the one passed, a stock DynamicCache turned into one in place
    (so the object the caller holds holds the K, V), or a new one."""
    n_layers, windows = len(state.binding.layers), state.binding.windows
    cache = call.cache
    if cache is None:
        return ChunkKVCache(n_layers, state.host, windows)
    if not isinstance(cache, ChunkKVCache):
        ChunkKVCache.adopt_in_place(cache, n_layers, state.host, windows)  # raises, unchanged, when it cannot
    elif cache.host is None:
        cache.host = state.host
    check_cache(cache, state, batch)
    cache.filled_by = state.binding
    return cache


@dataclass(frozen=True)
class MaskLayout:
    """A 2-D padding mask as the loop reads it: each row 0^a 1^m 0^z."""

    starts: list[int] | None   # a per row (None: no leading zeros anywhere)
    trailing: bool             # some row ends in zeros


def mask_layout(mask: torch.Tensor | None, past: int, s: int) -> MaskLayout:
    """Read the mask (one small device-to-host copy). Raises NotOnLoop for masks the kernels cannot
    express: zeros between ones, trailing zeros over cached positions, a row with no visible token."""
    if mask is None:
        return MaskLayout(None, False)
    m = mask.bool()
    n = m.shape[1]
    idx = torch.arange(n, device=m.device)
    ones = m.sum(1)
    lead = torch.where(m.any(1), m.int().argmax(1), n)
    contiguous = (m == ((idx[None] >= lead[:, None]) & (idx[None] < (lead + ones)[:, None]))).all(1)
    lead_h, ones_h, ok = torch.stack([lead, ones, contiguous.long()]).tolist()
    if not all(ok):
        raise NotOnLoop("attention_mask with zeros between ones (padding inside a sequence, or a continuation of a "
                        "right-padded cache: the kernels express left and right padding)")
    if any(o == 0 for o in ones_h):
        raise NotOnLoop("a sequence that is all padding")
    ends = [a + o for a, o in zip(lead_h, ones_h)]
    if any(e < past for e in ends):
        raise NotOnLoop("attention_mask with trailing zeros over cached positions (a right-padded cache)")
    return MaskLayout(lead_h if any(lead_h) else None, any(e < n for e in ends))


def config_use_cache(model) -> bool:
    return bool(getattr(model.config, "use_cache", True))


def _output(loss=None, logits=None, cache=None, hidden_states=None) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **{_OUTPUT_CACHE_FIELD: cache})


def _as_requested(model, out: CausalLMOutputWithPast, return_dict: bool | None):
    return_dict = getattr(model.config, "return_dict", True) if return_dict is None else return_dict
    return out if return_dict else out.to_tuple()


def converted_forward(model, *args, **kwargs):
    state: ConvertedState = model._chunkinfer
    call = read_call(state, model, args, kwargs)
    reason = stock_reason(model, state, call)
    if reason is None:
        try:
            with torch.no_grad():
                return _as_requested(model, _loop_forward(model, state, call), call.get("return_dict"))
        except NotOnLoop as exc:
            reason = str(exc)
    cache = call.cache
    if isinstance(cache, ChunkKVCache) and cache.streamed_layers():
        raise ValueError(f"chunkinfer: {reason} needs the stock transformers forward, which cannot run on a "
                         "cache with host-resident (offloaded) layers")
    _warn_once(state, reason)
    return type(model).forward(model, *args, **kwargs)


def _loop_forward(model, state: ConvertedState, call: Call) -> CausalLMOutputWithPast:
    mb = state.binding
    given = call.cache
    past = given.get_seq_length() if given is not None else 0
    b, s = check_inputs(model, call.args, past)
    layout = mask_layout(call.get("attention_mask"), past, s)  # raises NotOnLoop before the cache is touched
    cp = call.get("cache_position")
    if cp is not None and not torch.equal(cp.reshape(-1).cpu(), torch.arange(past, past + s)):
        raise NotOnLoop("cache_position other than the cache's next positions")
    cache = take_cache(call, state, b)
    use_cache = call.get("use_cache")
    use_cache = config_use_cache(model) if use_cache is None else use_cache
    keep_cache = use_cache or given is not None
    ohs = call.get("output_hidden_states")
    want_hidden = bool(ohs if ohs is not None else getattr(model.config, "output_hidden_states", False))
    ltk = call.get("logits_to_keep", 0)
    labels = call.get("labels")
    plain = labels is None and not want_hidden and not torch.is_tensor(ltk)
    if plain and past > 0 and s <= STEP_TOKENS:
        keep = s if ltk == 0 else min(ltk, s)
        logits = run_step(state, cache, call.get("input_ids"), call.get("inputs_embeds"), call.get("position_ids"),
                          past, layout.starts, keep)
        return _output(logits=logits, cache=cache if keep_cache else None)
    tail = 0  # rows after the first kept one, run as a step once the rows before them are cached
    if plain and isinstance(ltk, int) and 2 <= ltk <= min(s, STEP_TOKENS + 1) and not layout.trailing:
        tail = ltk - 1
    out = _prompt(model, state, cache, call, past, s - tail, layout, want_hidden, 1 if tail else ltk)
    if tail:
        def rows(name):
            x = call.get(name)
            return None if x is None else x[:, s - tail:]
        step = run_step(state, cache, rows("input_ids"), rows("inputs_embeds"), rows("position_ids"),
                        past + s - tail, layout.starts, tail)
        out.logits = torch.cat([out.logits, step], dim=1)
    setattr(out, _OUTPUT_CACHE_FIELD, cache if keep_cache else None)
    return out


def _prompt(model, state: ConvertedState, cache: ChunkKVCache, call: Call, past: int, s: int, layout: MaskLayout,
            want_hidden: bool, ltk) -> CausalLMOutputWithPast:
    """Rows [0, s) of the call through the chunked prefill: the logits ``ltk`` keeps, loss and hidden
    states as asked."""
    mb = state.binding
    ids, emb, pos = call.get("input_ids"), call.get("inputs_embeds"), call.get("position_ids")
    ids = None if ids is None else ids[:, :s]
    emb = None if emb is None else emb[:, :s]
    pos = None if pos is None else pos[:, :s]
    b = (ids if ids is not None else emb).shape[0]
    labels = call.get("labels")
    last_rows_from = 0
    if isinstance(ltk, int) and 0 < ltk < s and labels is None and not want_hidden:
        last_rows_from = s - ltk
    logits_rows = len(ltk) if torch.is_tensor(ltk) else (s if ltk == 0 else min(ltk, s))
    weight = mb.embed.weight
    prompt = PromptCall(b, past, s, weight.dtype, weight.device, last_rows_from == 0, logits_rows,
                        kv_compression_ratio=planned_kv_ratio(state, ids, emb, pos, past))
    chunk, chunks = plan_prompt_chunks(model, state, cache, prompt)  # before any allocation of the call
    if pos is None:
        pos = torch.arange(past, past + s, device=mb.devices.embed)[None]
    # no reference to the embedded stream is kept here: on a model spread over devices, the copy on
    # each device is freed once the stream has moved on
    inp = LoopInputs(hidden=mb.embed(ids) if emb is None else emb.clone(), position_ids=pos,
                     start=past, key_starts=layout.starts, chunk=chunk, last_rows_from=last_rows_from, chunks=chunks,
                     hidden_states=[] if want_hidden else None, progress=state.progress if s > 1 else None)
    cache.key_starts = layout.starts
    hidden = run_layers(mb, cache, inp)

    head_chunk = head_chunk_rows(chunk, model.config.vocab_size)
    hidden_states = None
    normed = False
    if want_hidden:
        hidden = final_norm(mb, hidden)  # requested: the whole normed sequence is an output
        normed = True
        hidden_states = (*inp.hidden_states, hidden)
    ce = None
    if labels is not None:
        targets = call.get("shift_labels")
        ce = ChunkedCrossEntropy(shifted_targets(labels) if targets is None else targets)
    logits = None
    if torch.is_tensor(ltk):
        sel = hidden[:, ltk.to(hidden.device)]
        logits = logits_of(mb, sel if normed else final_norm(mb, sel))
    keep_from = s if torch.is_tensor(ltk) else (0 if ltk == 0 else max(0, s - ltk))
    # one pass over the rows: the loss needs all of them, the returned logits only the kept ones
    for r0, r1, chunk_logits in iter_logits(mb, hidden, 0 if ce is not None else keep_from, s, head_chunk, normed):
        if ce is not None:
            ce.add(chunk_logits, r0, r1)
        if r1 > keep_from:
            if logits is None:
                logits = chunk_logits.new_empty(b, s - keep_from, chunk_logits.shape[-1])
            a0 = max(r0, keep_from)
            logits[:, a0 - keep_from:r1 - keep_from] = chunk_logits[:, a0 - r0:]
    loss = ce.result(call.get("num_items_in_batch")) if ce is not None else None
    return _output(loss=loss, logits=logits, hidden_states=hidden_states)


def planned_kv_ratio(state: ConvertedState, ids: torch.Tensor | None, emb: torch.Tensor | None,
                     pos: torch.Tensor | None, past: int) -> float | None:
    """With kv_compression on a CUDA model: the ratio the planner sizes encoded host KV by, measured on
    layer 0's K, V of the prompt's first rows (at most the calibration's) and taken down by the margin.
    None where no plan uses it (no compression, or the CPU, where host memory is the device's)."""
    host, mb = state.host, state.binding
    if host is None or host.compression is None:
        return None
    weight = mb.embed.weight
    if weight.dtype not in KV_CODEC_DTYPES:
        raise ValueError(f"kv_compression codes bfloat16 / float16 K, V; the model now runs in {weight.dtype} "
                         "(convert it again without kv_compression, or cast it back)")
    if weight.device.type != "cuda":
        return None
    settings = host.compression
    n = min((ids if ids is not None else emb).shape[1], settings.calibration_rows)
    device = mb.devices.layers[0]
    hidden = (mb.embed(ids[:, :n]) if ids is not None else emb[:, :n]).to(device)
    positions = torch.arange(past, past + n, device=device)[None] if pos is None else pos[:, :n].to(device)
    k, v = sample_kv(mb, hidden, positions)
    host.planned_ratio = settings.planned_ratio(measured_ratio(k, v, settings))
    return host.planned_ratio


def plan_prompt_chunks(model, state: ConvertedState, cache: ChunkKVCache,
                       call: PromptCall) -> tuple[int, list | None]:
    """Plan a prompt: place offloaded KV, choose the chunk schedule. Returns (chunk, per-layer chunks
    or None). Raises InsufficientMemoryError before any work."""
    chunk = state.chunk_size
    kind = call.device.type
    if state.offload is not None and kind != "cuda":  # host memory is the device: nothing to place
        place(cache, state.offload, None)
        return chunk, None
    if kind not in CHUNK_LIMITS:  # the planner models CUDA and CPU memory only
        return chunk, None
    if state.offload is None and state.memory_budget is None and (
            not state.plan_chunks or call.seq_len <= CHUNK_LIMITS[kind].floor):
        return chunk, None  # nothing to check, or one chunk whatever the plan (short prompts skip it)
    p = plan_prompt(model, call, cache, chunk_size=None if state.plan_chunks else chunk,
                    memory_budget=state.memory_budget, offload=state.offload, calibration=state.calibration)
    state.last_plan = p
    if state.offload is not None:
        place(cache, state.offload, p)
    if not state.plan_chunks:
        return chunk, None
    chunks = p.chunk_schedule or [p.breakdown_chunk] * len(state.binding.layers)  # "auto": try the smallest
    return min(chunks), chunks
