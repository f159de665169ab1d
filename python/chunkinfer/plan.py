"""plan(): will a long-context run fit, with which chunk size, and about how long will it take?

Memory is predicted from the shapes the layer loop allocates (layer_loop.py, cache.py, attention.py):

* the residual stream [B, S, H] in the model dtype (plus the int64 token ids and positions),
* per-layer K, V buffers [B, Hkv, cap, D], cap = round_up(S + 1024 headroom, 256) after a prefill
  (sliding-window layers keep every position too, as the current cache does),
* chunk work buffers of C rows: the MLP activation buffer [C, intermediate] kept for the whole loop,
  and per block the larger of the attention phase (q, k, v, block and prefix outputs, the fp32
  LSE-merge temporaries [B, Hq, C, D]) and the MLP phase (gate, up, down, o_proj output). The last
  layer only writes K, V for all but the last rows, so its own KV is allocated while only the small
  K, V-only temporaries are alive: the peak is the larger of "every layer's KV + K, V-only work" and
  "all but one layer's KV + a full block's work".

Times come from rates FITTED to H200 measurements (bf16, Llama-3.1-8B shape, chunk 8192); they are
estimates for that device only (see ``Plan.rates_from``).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from .transfer import available as offload_engine_available

GiB = 1 << 30

# ---- Measured device rates: NVIDIA H200, bf16, chunk 8192 --------------------------------------------
# Source: bench/results/model_h200.md (rows in bench/results/model_h200.jsonl), fitted with
# fit_prefill_rates / fit_decode_rates below on every "chunkinfer prefill" / "chunkinfer decode" row
# (least squares on the relative error; tests/test_plan.py re-fits them and checks these values).
# prefill seconds = linear-layer FLOPs / H200_LINEAR_FLOPS + attention FLOPs / H200_ATTENTION_FLOPS
H200_LINEAR_FLOPS = 4.225e14          # effective FLOP/s of the projections + MLP (incl. norms, rope, launches)
H200_ATTENTION_FLOPS = 6.408e14       # effective FLOP/s of causal attention (QK^T and PV)
# decode ms/token = bytes read (weights + KV at that length) / H200_DECODE_BYTES_PER_S + H200_DECODE_STEP_MS
H200_DECODE_BYTES_PER_S = 3.795e12
H200_DECODE_STEP_MS = 2.353
# host KV crosses PCIe once per decode step (or is attended where it lives): pinned host->device copy rate
H200_H2D_BYTES_PER_S = 55.4e9         # ../shared/ANCHORS.md, 2 GiB pinned copies
RATES_FROM = "H200 measurements, bench/results/model_h200.jsonl"

# ---- Allocation constants -----------------------------------------------------------------------------
_PREFILL_HEADROOM = 1024   # layer_loop._PREFILL_HEADROOM
_ALIGN = 256               # cache._ALIGN
_GROWTH = 1.25             # cache._GROWTH
_RUNTIME_FIXED = 128 << 20  # allocations beyond weights that do not scale with S (cuBLAS workspaces,
#                             decode CUDA-graph pools, rope tables): calibrated on the H200 rows
_CUDA_CONTEXT = 512 << 20   # CUDA context + kernels: outside torch's allocator, inside the device total
_ALLOCATOR_SLACK = 3 * GiB // 2  # reserved - allocated: largest measured gap 1.48 GiB (32k row)
_ALLOCATOR_SLACK_FRACTION = 0.02  # ... or this fraction of the allocations beyond weights, if larger
_HOST_USABLE = 0.9          # share of host memory the pinned KV arena may take

CHUNK_FLOOR = 1024
CHUNK_CAP = 16384
_OFFLOAD_CHUNK_CAP = 8192   # with host offload the chunk is not grown past the measured default

_SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                          "phi3": "Phi-3", "gemma3_text": "Gemma-3", "gemma3": "Gemma-3"}
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEM_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


# ---- argument parsing ---------------------------------------------------------------------------------
def parse_memory(value, what: str = "memory") -> int:
    """Bytes from an int or a string such as "139GiB", "80GB", "512MiB", "1.5TiB" (GB = 10^9, GiB = 2^30)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be bytes (int) or a string like '80GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what} must be > 0 bytes, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} must be a positive number of bytes, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be bytes (int) or a string like '80GiB', got {type(value).__name__}")
    m = _MEM_RE.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot parse {what} {value!r}: expected a number with an optional unit "
                         "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. '139GiB'")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{what} must be > 0 bytes, got {value!r}")
    return n


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of bfloat16, float16, float32")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32 (or a torch.dtype)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def load_config(config):
    """A transformers config from a config object, a config.json path or a model directory."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config not found: {path}")
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"cannot load a transformers config from {path}: {exc}") from exc
    if not hasattr(config, "model_type") or not hasattr(config, "to_dict"):
        raise TypeError(f"config must be a transformers PretrainedConfig or a path to config.json, "
                        f"got {type(config).__name__}")
    if config.model_type == "gemma3" and hasattr(config, "text_config"):
        config = config.text_config
    if config.model_type not in _SUPPORTED_MODEL_TYPES:
        names = sorted(set(_SUPPORTED_MODEL_TYPES.values()))
        raise ValueError(f"unsupported model_type {config.model_type!r}; chunkinfer supports "
                         f"{', '.join(names)} ({', '.join(sorted(_SUPPORTED_MODEL_TYPES))})")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit soft-capping (config.attn_logit_softcapping) is not supported")
    return config


# ---- model shape ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the planner needs from a config."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    n_q: int
    n_kv: int
    head_dim: int
    vocab: int
    tied: bool
    windows: tuple  # per layer: sliding window (tokens) or None
    qkv_bias: bool
    mlp_bias: bool
    qk_norm: bool
    gemma_norms: bool
    fused: bool     # Phi-3: qkv_proj and gate_up_proj are single tensors

    @classmethod
    def from_config(cls, config) -> "Shape":
        mt = config.model_type
        for attr in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "vocab_size"):
            v = getattr(config, attr, None)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"config.{attr} must be a positive int, got {v!r}")
        n_q = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_q
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
        if n_q % n_kv:
            raise ValueError(f"{n_q} query heads is not a multiple of {n_kv} KV heads")
        layers = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if mt == "qwen2" or mt == "qwen3":
            if not getattr(config, "use_sliding_window", False):
                window = None
        if layer_types is not None:
            if len(layer_types) < layers:
                raise ValueError(f"config.layer_types has {len(layer_types)} entries for {layers} layers")
            windows = tuple(window if (t == "sliding_attention" and window) else None
                            for t in layer_types[:layers])
        else:
            windows = (window,) * layers if window else (None,) * layers
        return cls(model_type=mt, layers=layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, n_q=n_q, n_kv=n_kv, head_dim=head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   windows=windows, qkv_bias=bool(getattr(config, "attention_bias", mt == "qwen2")),
                   mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=mt in ("qwen3", "gemma3_text"),
                   gemma_norms=mt == "gemma3_text", fused=mt == "phi3")

    def layer_linear_params(self) -> int:
        h, q, kv, i = self.hidden, self.n_q * self.head_dim, self.n_kv * self.head_dim, self.intermediate
        n = h * (q + 2 * kv) + q * h + 3 * h * i
        if self.qkv_bias:
            n += q + 2 * kv
        if self.mlp_bias:
            n += 2 * i + h
        return n

    def weight_params(self) -> int:
        norms = (4 if self.gemma_norms else 2) * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = self.layer_linear_params() + norms
        emb = self.vocab * self.hidden
        return self.layers * per_layer + emb * (1 if self.tied else 2) + self.hidden

    def kv_bytes_per_token_layer(self, elt: int) -> int:
        return 2 * self.n_kv * self.head_dim * elt


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def kv_capacity(seq_len: int, decode_tokens: int = 0) -> tuple[int, int]:
    """(capacity after prefill + decode, capacity before the last growth) in positions, as cache.py grows it."""
    cap = _round_up(seq_len + _PREFILL_HEADROOM)
    prev = cap
    needed = seq_len + decode_tokens
    while cap < needed:
        prev, cap = cap, max(_round_up(cap + 1), _round_up(int(cap * _GROWTH)))
    return cap, prev


def work_bytes(shape: Shape, rows: int, batch: int, elt: int, layer_kv: int) -> dict:
    """Chunk work-buffer bytes for ``rows`` rows (see the module docstring). ``layer_kv``: one layer's
    K+V bytes, allocated by the last layer only after the full-block temporaries are gone."""
    b, c = batch, rows
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    q = b * c * shape.n_q * shape.head_dim * elt          # [B, Hq, C, D] in the model dtype
    kv1 = b * c * shape.n_kv * shape.head_dim * elt       # one of k, v for the chunk
    act = b * c * i * elt                                 # the reused MLP activation buffer
    lse = b * shape.n_q * c * 4                           # fp32 log-sum-exp [B, Hq, C]
    merge = 3 * b * shape.n_q * c * shape.head_dim * 4    # fp32 LSE-merge temporaries alive at once
    qkv_live = b * c * (shape.n_q + 2 * shape.n_kv) * shape.head_dim * elt if shape.fused else 2 * kv1
    attention = q + 2 * kv1 + 2 * q + 2 * lse + merge     # q, k, v, block + prefix outputs, merge
    attention_block = q + 2 * kv1 + 2 * q + q  # q, k, v, K/V repeated to Hq, block output
    band = max((b * (shape.n_q // shape.n_kv) * c * (c + w) for w in shape.windows if w), default=0)
    windowed = q + 2 * kv1 + band + q
    mlp = q + qkv_live + q + 2 * b * c * h * elt + 2 * b * c * i * elt  # + attn out, o, down, gate, up
    block = max(attention, attention_block, windowed, mlp)
    kv_only = b * c * h * elt + 2 * kv1 + 3 * kv1 + b * v * elt + b * h * elt  # norm, k, v, rope, logits
    effective = max(block - layer_kv, kv_only) if shape.layers > 1 else max(block, kv_only)
    return {"mlp_activation": act, "block": block, "kv_only": kv_only, "effective": act + effective}


# ---- time model -----------------------------------------------------------------------------------------
def prefill_flops(shape: Shape, seq_len: int, batch: int = 1) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) of one prefill of ``seq_len`` tokens."""
    linear = 2.0 * batch * seq_len * shape.layers * shape.layer_linear_params() + 2.0 * batch * shape.hidden * shape.vocab
    per_pair = 4.0 * shape.n_q * shape.head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    attn = 0.0
    s = float(seq_len)
    for w in shape.windows:
        if w is None or w >= seq_len:
            pairs = s * (s + 1) / 2
        else:  # the windowed path computes a dense band per chunk: about S * (window + chunk/2) pairs
            pairs = w * (w + 1) / 2 + (s - w) * w
        attn += per_pair * pairs
    return linear, batch * attn


def decode_bytes(shape: Shape, length: int, batch: int, elt: int) -> float:
    """Bytes one decode step reads: every weight but the embedding table (one row), plus the K, V in view."""
    weights = shape.weight_params() - (0 if shape.tied else shape.vocab * shape.hidden)
    kv = 0
    for w in shape.windows:
        kv += shape.kv_bytes_per_token_layer(elt) * (length if w is None else min(length, w))
    return weights * elt + batch * kv


def fit_prefill_rates(shape: Shape, points) -> tuple[float, float]:
    """(linear FLOP/s, attention FLOP/s) from (seq_len, seconds) points, batch 1: least squares on
    the relative error of seconds = lin/R_lin + attn/R_attn."""
    rows = [(*prefill_flops(shape, s), t) for s, t in points]
    x, y = _rel_lstsq([(lin / t, att / t) for lin, att, t in rows])
    return 1.0 / x, 1.0 / y


def fit_decode_rates(shape: Shape, points, elt: int = 2) -> tuple[float, float]:
    """(bytes/s, per-step ms) from (length, ms/token) points: ms = bytes / bw * 1e3 + step_ms,
    least squares on the relative error."""
    x, y = _rel_lstsq([(decode_bytes(shape, n, 1, elt) * 1e3 / ms, 1.0 / ms) for n, ms in points])
    return 1.0 / x, y


def _rel_lstsq(rows) -> tuple[float, float]:
    """Solve min sum (a*u + b*v - 1)^2 over rows (u, v)."""
    suu = sum(u * u for u, _ in rows)
    svv = sum(v * v for _, v in rows)
    suv = sum(u * v for u, v in rows)
    su = sum(u for u, _ in rows)
    sv = sum(v for _, v in rows)
    det = suu * svv - suv * suv
    if det == 0:
        raise ValueError("degenerate fit: need at least two distinct lengths")
    return (su * svv - sv * suv) / det, (sv * suu - su * suv) / det


# ---- the plan -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    model_type: str
    seq_len: int
    batch: int
    dtype: str
    chunk_size: int | None                 # None: no chunk size fits (the breakdown is for breakdown_chunk)
    breakdown_chunk: int
    kv_capacity: int                       # positions per layer buffer
    resident_layers: list[int]             # layers whose K, V stay on the device
    host_layers: list[int]                 # layers whose K, V would live in pinned host memory
    device_breakdown: dict[str, int]       # predicted peak device bytes by part
    host_breakdown: dict[str, int]         # predicted host bytes by part
    device_memory: int
    host_memory: int
    prefill_seconds: float
    decode_ms_per_token: float
    decode_seconds: float
    fits: bool
    reason: str
    offload_available: bool = True         # the host-offload engine is built into this install
    allow_offload: bool = True
    rates_from: str = RATES_FROM
    notes: list[str] = field(default_factory=list)

    @property
    def device_bytes(self) -> int:
        return sum(self.device_breakdown.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host_breakdown.values())

    @property
    def peak_alloc_beyond_weights(self) -> int:
        """What torch.cuda.max_memory_allocated() - weights should read after the run."""
        skip = {"weights", "allocator margin"}
        return sum(v for k, v in self.device_breakdown.items() if k not in skip)

    def table(self) -> str:
        def g(n: int) -> str:
            return f"{n / GiB:10.2f}"

        lines = [f"chunkinfer plan: {self.model_type}, {self.seq_len:,} tokens x batch {self.batch}, {self.dtype}",
                 (f"chunk size {self.chunk_size}" if self.chunk_size else
                  f"no chunk size fits (shown: chunk {self.breakdown_chunk})") + f", KV capacity {self.kv_capacity:,} "
                 f"positions/layer, KV layers resident {len(self.resident_layers)}, on host {len(self.host_layers)}",
                 "",
                 f"{'device (peak)':<34}{'GiB':>10}"]
        lines += [f"  {k:<32}{g(v)}" for k, v in self.device_breakdown.items()]
        lines += [f"  {'total':<32}{g(self.device_bytes)}", f"  {'available':<32}{g(self.device_memory)}", "",
                  f"{'host':<34}{'GiB':>10}"]
        lines += [f"  {k:<32}{g(v)}" for k, v in self.host_breakdown.items()]
        lines += [f"  {'total':<32}{g(self.host_bytes)}",
                  f"  {'available':<32}{g(self.host_memory)}", "",
                  f"prefill   {self.prefill_seconds:10.2f} s",
                  f"decode    {self.decode_ms_per_token:10.2f} ms/token"
                  + (f" ({self.decode_seconds:.2f} s in all)" if self.decode_seconds else ""),
                  f"(times: {self.rates_from})", "",
                  f"fits: {'yes' if self.fits else 'no'}" + ("" if self.fits else f": {self.reason}")]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _default_device_memory() -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device to read the memory size from; pass device_memory "
                           "(bytes or a string such as '80GiB')")
    return torch.cuda.mem_get_info()[1]


def _default_host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as exc:
        raise RuntimeError("cannot read the host memory size; pass host_memory") from exc


def _chunk_candidates(seq_len: int, cap: int = CHUNK_CAP) -> list[int]:
    """Powers of two in [CHUNK_FLOOR, cap], at most seq_len rounded up to a power of two; largest first."""
    top = max(CHUNK_FLOOR, 1 << max(0, (seq_len - 1).bit_length()))
    out, c = [], CHUNK_FLOOR
    while c <= min(cap, top):
        out.append(c)
        c *= 2
    return out[::-1]


def _slack(beyond_weights: int) -> int:
    return _CUDA_CONTEXT + max(_ALLOCATOR_SLACK, int(_ALLOCATOR_SLACK_FRACTION * beyond_weights))


def plan(config, seq_len: int, *, batch: int = 1, dtype=torch.bfloat16, device_memory=None, host_memory=None,
         decode_tokens: int = 0, chunk_size: int | None = None, allow_offload: bool = True,
         resident_layers: int | None = None) -> Plan:
    """Predict device / host memory, chunk size and times of a prefill of ``seq_len`` tokens (plus
    ``decode_tokens`` generated ones) with chunkinfer. Memories: bytes or strings like "139GiB".

    KV placement: every layer resident when that fits; else, with ``allow_offload``, the first layers
    resident and the rest in pinned host memory, as many resident as fit. ``resident_layers`` fixes
    that count instead (the chunk must then fit with it)."""
    seq_len = _positive_int(seq_len, "seq_len")
    batch = _positive_int(batch, "batch")
    decode_tokens = _positive_int(decode_tokens, "decode_tokens", minimum=0)
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    if not isinstance(allow_offload, bool):
        raise TypeError(f"allow_offload must be a bool, got {type(allow_offload).__name__}")
    offload_available = offload_engine_available()
    allow_offload = allow_offload and offload_available
    dt = parse_dtype(dtype)
    elt = torch.empty((), dtype=dt).element_size()
    config = load_config(config)
    shape = Shape.from_config(config)
    dev = parse_memory(device_memory, "device_memory") if device_memory is not None else _default_device_memory()
    host = parse_memory(host_memory, "host_memory") if host_memory is not None else _default_host_memory()

    L = shape.layers
    weights = shape.weight_params() * elt
    residual = batch * seq_len * shape.hidden * elt + 2 * batch * seq_len * 8  # + int64 ids, positions
    cap, prev_cap = kv_capacity(seq_len, decode_tokens)
    layer_kv = batch * cap * shape.kv_bytes_per_token_layer(elt)
    growth_kv = batch * prev_cap * shape.kv_bytes_per_token_layer(elt) if cap != prev_cap else 0

    def device_parts(rows: int, n_resident: int) -> dict:
        n_host = L - n_resident
        # offload: two layers' K, V staged on the device (the one computed, the one draining to the host)
        staging = min(2, n_host) * layer_kv if n_host else 0
        # the last-layer shortcut saving (work_bytes' layer_kv) applies only when the last layer is resident
        w = work_bytes(shape, rows, batch, elt, layer_kv if n_host == 0 else 0)
        parts = {"weights": weights, "residual stream": residual, "KV resident": n_resident * layer_kv + growth_kv}
        if n_host:
            parts["KV offload staging"] = staging
        parts["chunk work buffers"] = w["effective"]
        parts["runtime fixed"] = _RUNTIME_FIXED
        parts["allocator margin"] = _slack(sum(parts.values()) - weights)
        return parts

    def total(parts: dict) -> int:
        return sum(parts.values())

    notes: list[str] = []
    rows_of = lambda c: min(c, seq_len)  # noqa: E731 - the loop's buffers hold min(chunk, S) rows
    if chunk_size is not None:
        candidates = [chunk_size]
    else:
        candidates = _chunk_candidates(seq_len)
    chosen, n_resident = None, L
    for c in candidates:
        if total(device_parts(rows_of(c), L)) <= dev:
            chosen = c
            break
    if resident_layers is not None:
        n_resident = _positive_int(resident_layers, "resident_layers", minimum=0)
        if n_resident > L:
            raise ValueError(f"resident_layers must be <= the model's {L} layers, got {n_resident}")
        if n_resident < L and not offload_available:
            raise ValueError("resident_layers < layers needs the KV offload engine, which this build lacks")
        cands = candidates if n_resident == L else ([c for c in candidates if c <= _OFFLOAD_CHUNK_CAP] or candidates[-1:])
        chosen = next((c for c in cands if total(device_parts(rows_of(c), n_resident)) <= dev), None)
    elif chosen is None and allow_offload:
        off = [c for c in candidates if c <= _OFFLOAD_CHUNK_CAP] or candidates[-1:]
        for c in off:
            if total(device_parts(rows_of(c), 0)) <= dev:
                chosen = c
                break
        if chosen is not None:
            n_resident = 0
            while n_resident + 1 < L and total(device_parts(rows_of(chosen), n_resident + 1)) <= dev:
                n_resident += 1
    report_chunk = chosen if chosen is not None else candidates[-1]
    parts = device_parts(rows_of(report_chunk), n_resident)
    n_host = L - n_resident
    host_kv = n_host * layer_kv
    # the arena hands out exact regions from 1 GiB slabs: at most one slab's tail is unused
    host_parts = {"KV on host": host_kv, "pinned arena slab tail": GiB if n_host else 0}
    host_usable = int(host * _HOST_USABLE)

    need_dev = total(parts)
    reason = ""
    if chosen is None:
        what = f"chunk {candidates[0]}" if chunk_size is not None else f"the smallest chunk ({candidates[-1]})"
        if resident_layers is not None:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} and {n_resident} "
                      f"layers' KV resident, but only {dev:,} bytes ({dev / GiB:.2f} GiB) are available")
        elif allow_offload:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} even with every "
                      f"layer's KV on the host, but only {dev:,} bytes ({dev / GiB:.2f} GiB) are available")
        else:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} and every layer's "
                      f"KV resident, but only {dev:,} bytes ({dev / GiB:.2f} GiB) are available")
            alt = plan(config, seq_len, batch=batch, dtype=dt, device_memory=dev, host_memory=host,
                       decode_tokens=decode_tokens, chunk_size=chunk_size) if offload_available else None
            if alt is None:
                reason += "; this build has no KV offload engine"
            elif alt.fits:
                reason += (f"; with KV offload (allow_offload=True) {len(alt.host_layers)} of {L} layers' KV would "
                           "go to pinned host memory and it fits")
            else:
                reason += "; KV offload would not fit either"
    elif n_host and total(host_parts) > host_usable:
        hb = total(host_parts)
        reason = (f"host needs {hb:,} bytes ({hb / GiB:.2f} GiB) for {n_host} layers' KV (the device holds "
                  f"{n_resident} of {L} layers), but only "
                  f"{host_usable:,} bytes ({host_usable / GiB:.2f} GiB, {_HOST_USABLE:.0%} of {host / GiB:.2f} GiB) "
                  "are usable")
    fits = not reason
    if fits and n_host:
        notes.append(f"layers {n_resident}..{L - 1} keep their KV in pinned host memory (kv_offload=True); "
                     "each decode step streams it to the device once")
    if dt != torch.bfloat16:
        notes.append("times are bf16 measurements; other dtypes are not calibrated")
    if any(shape.windows):
        notes.append("sliding-window layers keep every position in the current cache (counted in full)")

    lin, att = prefill_flops(shape, seq_len, batch)
    prefill_s = lin / H200_LINEAR_FLOPS + att / H200_ATTENTION_FLOPS
    if decode_tokens:
        mean_len = seq_len + decode_tokens / 2
        per_tok = decode_bytes(shape, int(mean_len), batch, elt) * 1e3 / H200_DECODE_BYTES_PER_S + H200_DECODE_STEP_MS
    else:
        per_tok = decode_bytes(shape, seq_len, batch, elt) * 1e3 / H200_DECODE_BYTES_PER_S + H200_DECODE_STEP_MS
    # the host part crosses PCIe each step, overlapped with the resident part's reads
    mean = seq_len + decode_tokens // 2
    per_tok += n_host * batch * mean * shape.kv_bytes_per_token_layer(elt) * 1e3 / H200_H2D_BYTES_PER_S
    return Plan(model_type=shape.model_type, seq_len=seq_len, batch=batch, dtype=_dtype_name(dt),
                chunk_size=chosen, breakdown_chunk=report_chunk, kv_capacity=cap, resident_layers=list(range(n_resident)),
                host_layers=list(range(n_resident, L)), device_breakdown=parts, host_breakdown=host_parts,
                device_memory=dev, host_memory=host, prefill_seconds=prefill_s, decode_ms_per_token=per_tok,
                decode_seconds=per_tok * decode_tokens / 1e3, fits=fits, reason=reason,
                allow_offload=allow_offload, offload_available=offload_available, notes=notes)
