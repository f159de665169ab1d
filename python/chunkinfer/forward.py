"""The forward a converted model runs: argument checks, cache choice, the layer loop, logits and loss.

Whatever the loop does not support goes to the model's stock forward (warned once per reason).
"""
from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kv.cache import ChunkKVCache
from .kv.placement import PromptCall, place, plan_prompt
from .loop.head import final_norm, head_chunk_rows, iter_logits, logits_of
from .loop.loss import ChunkedCrossEntropy, shifted_targets
from .loop.prefill import LoopInputs, run_layers
from .models.devices import moves_inputs
from .planner.schedule import CHUNK_LIMITS
from .state import ConvertedState

_HANDLED_KWARGS = {"output_hidden_states", "output_attentions", "num_items_in_batch", "shift_labels",
                   "return_dict"}
_PLAIN_DECODE_KWARGS = frozenset({"input_ids", "past_key_values", "use_cache", "attention_mask", "logits_to_keep",
                                   "return_dict"})
_DECODE_MAX_TOKENS = 64  # calls at most this long on a non-empty cache reuse the recorded padding


class _Fallback(Exception):
    """The loop does not handle this call; the stock forward does."""


def _warn_once(state: ConvertedState, reason: str) -> None:
    if reason not in state.warned:
        state.warned.add(reason)
        warnings.warn(f"chunkinfer: {reason}; running the stock transformers forward for such calls",
                      stacklevel=3)


def _needs_stock(model, a: dict, extra: dict) -> str | None:
    if torch.is_grad_enabled():
        emb = a.get("inputs_embeds")
        if (emb is not None and emb.requires_grad) or any(p.requires_grad for p in model.parameters()):
            return "autograd is recording (training)"
    unknown = set(extra) - _HANDLED_KWARGS
    if unknown:
        return f"unsupported forward arguments {sorted(unknown)}"
    if extra.get("output_attentions"):
        return "output_attentions=True"
    ohs = extra.get("output_hidden_states")
    if ohs is not None and not isinstance(ohs, bool):
        return "output_hidden_states given as layer indices"
    mask = a.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
        return "attention_mask that is not a 2-D padding mask"
    ltk = a.get("logits_to_keep", 0)
    if torch.is_tensor(ltk) and ltk.dim() != 1:
        return "logits_to_keep given as a 2-D tensor"
    pkv = a.get("past_key_values")
    if pkv is not None and not isinstance(pkv, (ChunkKVCache, DynamicCache)):
        return f"past_key_values of type {type(pkv).__name__}"
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
    return b, s


def _linked(pkv):
    linked = getattr(pkv, "_chunkinfer_cache", None)
    if linked is not None and pkv.get_seq_length() == pkv._chunkinfer_linked_len:
        return linked
    return None


def _past_length(pkv) -> int:
    if pkv is None:
        return 0
    linked = None if isinstance(pkv, ChunkKVCache) else _linked(pkv)
    return (linked or pkv).get_seq_length()


def _select_cache(pkv, windows: list, host) -> ChunkKVCache:
    """The ChunkKVCache this call continues. A stock DynamicCache is linked to the ChunkKVCache that
    replaces it, so passing the same DynamicCache again continues where it left off."""
    n_layers = len(windows)
    if pkv is None:
        return ChunkKVCache(n_layers, host, windows)
    if isinstance(pkv, ChunkKVCache):
        if pkv.host is None:
            pkv.host = host
        return pkv
    linked = _linked(pkv)
    if linked is not None:
        return linked
    cache = (ChunkKVCache(n_layers, host, windows) if pkv.get_seq_length() == 0
             else ChunkKVCache.adopt(pkv, n_layers, windows))
    cache.host = host
    pkv._chunkinfer_cache, pkv._chunkinfer_linked_len = cache, pkv.get_seq_length()
    return cache


def padding_starts(mask: torch.Tensor | None, cache: ChunkKVCache, past: int, s: int) -> list[int] | None:
    """Each sequence's left padding as a cache position, or None when nothing is padded. Raises
    _Fallback for masks that are not left padding. Reads the mask on the host (one sync) except for
    decode steps on a cache whose padding is known: those assume generate()'s mask (past pattern + ones)."""
    if mask is None:
        return None
    if cache.key_starts_known and past > 0 and s <= _DECODE_MAX_TOKENS:
        return cache.key_starts
    m = mask.bool()
    pads = (~m).sum(1)
    left_padded = (m == (torch.arange(m.shape[1], device=m.device)[None] >= pads[:, None])).all(1)
    host = torch.stack([pads, left_padded.long()]).tolist()
    if not all(host[1]):
        raise _Fallback("attention_mask with zeros after the first one (only left padding is supported)")
    starts = host[0]
    if any(p >= past + s for p in starts):
        raise _Fallback("a sequence that is all padding")
    return starts if any(starts) else None


def _plain_decode_step(model, state: ConvertedState, args: tuple, kwargs: dict) -> tuple | None:
    """_graph_decode's arguments when this call is a plain decode step (generate()'s every step after
    the first): one int64 token per sequence on a ChunkKVCache whose layers are all on the device, no
    mask beyond the padding the cache recorded, no positions given. None for anything else, which the
    general path checks and runs. Every microsecond before the replay adds to the step's latency, and
    binding the signature and the general checks take tens of them."""
    if len(args) > 1 or (args and "input_ids" in kwargs) or not _PLAIN_DECODE_KWARGS.issuperset(kwargs):
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    cache, ltk = kwargs.get("past_key_values"), kwargs.get("logits_to_keep", 0)
    if (not state.cuda_graphs or type(cache) is not ChunkKVCache or cache.host is not None
            or type(ltk) is not int or ltk < 0 or not torch.is_tensor(ids) or ids.dtype != torch.long
            or ids.dim() != 2 or ids.shape[1] != 1 or torch.is_grad_enabled()):
        return None
    past, b, weight = cache.get_seq_length(), ids.shape[0], state.binding.embed.weight
    if past == 0 or cache.layers[0].batch_size != b or ids.device != weight.device:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and not (cache.key_starts_known and torch.is_tensor(mask) and mask.shape == (b, past + 1)):
        return None
    if model.config.output_hidden_states or not state.graphs.supported(state.binding, weight.device, weight.dtype):
        return None
    return cache, ids, None, past, None if mask is None else cache.key_starts, mask is not None, True


def converted_forward(model, *args, **kwargs):
    state: ConvertedState = model._chunkinfer
    step = _plain_decode_step(model, state, args, kwargs)
    if step is not None:
        return _as_requested(model, _graph_decode(state, *step), kwargs.get("return_dict"))
    bound = state.signature.bind(model, *args, **kwargs)
    a = dict(bound.arguments)
    a.pop("self", None)
    extra = dict(a.pop("kwargs", {}) or {})

    reason = _needs_stock(model, a, extra)
    if reason is None:
        try:
            out = _chunked_forward(model, state, a, extra)
        except _Fallback as exc:
            reason = str(exc)
    if reason is not None:
        pkv = a.get("past_key_values")
        if isinstance(pkv, ChunkKVCache) and pkv.streamed_layers():
            raise ValueError(f"chunkinfer: {reason} needs the stock transformers forward, which cannot run on a "
                             "cache with host-resident (offloaded) layers")
        _warn_once(state, reason)
        if isinstance(pkv, ChunkKVCache):
            pkv.key_starts_known = False
        return type(model).forward(model, *args, **kwargs)
    return _as_requested(model, out, extra.get("return_dict"))


def _as_requested(model, out: CausalLMOutputWithPast, return_dict: bool | None):
    return_dict = getattr(model.config, "return_dict", True) if return_dict is None else return_dict
    return out if return_dict else out.to_tuple()


@torch.no_grad()
def _chunked_forward(model, state: ConvertedState, a: dict, extra: dict) -> CausalLMOutputWithPast:
    mb = state.binding
    pkv = a.get("past_key_values")
    past = _past_length(pkv)
    b, s = check_inputs(model, a, past)
    cache = _select_cache(pkv, mb.windows, state.host)
    if cache.get_seq_length() and cache.layers[0].batch_size != b:
        raise ValueError(f"past_key_values holds batch {cache.layers[0].batch_size}, input has batch {b}")
    mask = a.get("attention_mask")
    key_starts = padding_starts(mask, cache, past, s)
    weight = mb.embed.weight

    use_cache = a.get("use_cache")
    use_cache = config_use_cache(model) if use_cache is None else use_cache
    labels = a.get("labels")
    ltk = a.get("logits_to_keep", 0)
    want_hidden = bool(extra.get("output_hidden_states") or model.config.output_hidden_states)
    last_rows_from = 0
    if isinstance(ltk, int) and 0 < ltk < s and labels is None and not want_hidden:
        last_rows_from = s - ltk
    logits_rows = len(ltk) if torch.is_tensor(ltk) else (s if ltk == 0 else min(ltk, s))
    call = PromptCall(b, past, s, weight.dtype, weight.device, last_rows_from == 0, logits_rows)
    chunk, chunks = _plan_chunks(model, state, cache, call)  # before any allocation of the call

    emb = a.get("inputs_embeds")
    pos = a.get("position_ids")
    if (state.cuda_graphs and s == 1 and past > 0 and emb is None and labels is None and not want_hidden
            and isinstance(ltk, int) and not cache.streamed_layers()
            and state.graphs.supported(mb, mb.devices.embed, mb.embed.weight.dtype)):
        return _graph_decode(state, cache, a["input_ids"], pos, past, key_starts, mask is not None,
                             use_cache or pkv is not None)
    if pos is None:
        pos = torch.arange(past, past + s, device=mb.devices.embed)[None]

    # no reference to the embedded stream is kept here: on a model spread over devices, the copy on
    # each device is freed once the stream has moved on
    inp = LoopInputs(hidden=mb.embed(a["input_ids"]) if emb is None else emb.clone(), position_ids=pos,
                     start=past, key_starts=key_starts, chunk=chunk, last_rows_from=last_rows_from, chunks=chunks,
                     hidden_states=[] if want_hidden else None, progress=state.progress if s > 1 else None)
    cache.key_starts, cache.key_starts_known = key_starts, mask is not None
    hidden = run_layers(mb, cache, inp)

    head_chunk = head_chunk_rows(chunk, model.config.vocab_size)
    hidden_states = None
    normed = False
    if want_hidden:
        hidden = final_norm(mb, hidden)  # requested: the whole normed sequence is an output
        normed = True
        hidden_states = (*inp.hidden_states, hidden)

    loss = None
    ce = None
    if labels is not None:
        targets = extra.get("shift_labels")
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
    if ce is not None:
        loss = ce.result(extra.get("num_items_in_batch"))

    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  past_key_values=cache if (use_cache or pkv is not None) else None,
                                  hidden_states=hidden_states)


def _plan_chunks(model, state: ConvertedState, cache: ChunkKVCache, call: PromptCall) -> tuple[int, list | None]:
    """Plan a prompt (not a one-token step on a cache): place offloaded KV, choose the chunk schedule.
    Returns (chunk, per-layer chunks or None). Raises InsufficientMemoryError before any work."""
    chunk = state.chunk_size
    kind = call.device.type
    if call.seq_len == 1 and call.past > 0:
        return chunk, None
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


def _graph_decode(state: ConvertedState, cache: ChunkKVCache, ids: torch.Tensor, pos: torch.Tensor | None, past: int,
                  key_starts: list[int] | None, mask_given: bool, return_cache: bool) -> CausalLMOutputWithPast:
    """One new token per sequence through the captured decode step (decode_graph.py)."""
    logits = state.graphs.step(state.binding, cache, ids, pos, past, key_starts)
    for layer in cache.layers:
        layer.length = past + 1
    cache.key_starts, cache.key_starts_known = key_starts, mask_given
    return CausalLMOutputWithPast(logits=logits, past_key_values=cache if return_cache else None)


def config_use_cache(model) -> bool:
    return bool(getattr(model.config, "use_cache", True))
