"""plan(): will a long-context run fit, with which chunk size(s), and about how long will it take?

Memory is predicted from the shapes the layer loop allocates (layer_loop.py, cache.py, attention.py):

* the residual stream [B, S, H] in the model dtype (plus the int64 token ids and positions),
* per-layer K, V buffers [B, Hkv, cap, D], cap = round_up(S + 1024 headroom, 256) after a prefill
  (sliding-window layers keep every position too, as the current cache does),
* chunk work buffers of C rows: the MLP activation buffer [C, intermediate] kept for the layer,
  and per block the larger of the attention phase (q, k, v, block and prefix outputs, the fp32
  LSE-merge temporaries [B, Hq, C, D]) and the MLP phase (gate, up, down, o_proj output). The last
  layer only writes K, V for all but the last rows, so its own KV is allocated while only the small
  K, V-only temporaries are alive: the peak is the larger of "every layer's KV + K, V-only work" and
  "all but one layer's KV + a full block's work".

Layer by layer (chunk_schedule.py): layer l runs with the KV of layers [0, l] allocated, so the chunk
may shrink as the KV grows (a decreasing schedule, one chunk per layer), keeping the peak under the
budget; in a continuation (``past`` > 0) a growing layer holds its old and new buffers while copying.

Beyond these shapes, a ``Calibration`` per device: allocations that do not scale with the shapes
(workspaces; on the CPU also malloc's retention) as ``offset + (scale - 1) x shapes``. ``calibrate()``
(calibrate.py) measures it for one model on a short run and keeps it on that converted model.

On the CPU (``device="cpu"``) the plan predicts the process's peak resident set size (RSS): the
process baseline (a fresh interpreter with torch, transformers, chunkinfer and the model's modeling
code imported, measured once per process by starting one; or ``process_baseline``) + weights + the
parts above + the CPU calibration. Times are not predicted there (no CPU rates were measured).

Times come from rates FITTED to H200 measurements (bf16, Llama-3.1-8B shape, chunk 8192); they are
estimates for that device only (see ``Plan.rates_from``).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from .chunk_schedule import CallMemory, ChunkWork, choose, describe
from .head import head_chunk_rows
from .transfer import available as offload_engine_available

GiB = 1 << 30

# ---- Measured device rates: NVIDIA H200, bf16, chunk 8192 --------------------------------------------
# Source: bench/results/model_h200.md (rows in bench/results/model_h200.jsonl), fitted with
# fit_prefill_rates / fit_decode_rates below on every "chunkinfer prefill" / "chunkinfer decode" row
# (least squares on the relative error; tests/test_plan.py re-fits them and checks these values).
# prefill seconds = linear-layer FLOPs / H200_LINEAR_FLOPS + attention FLOPs / H200_ATTENTION_FLOPS
H200_LINEAR_FLOPS = 4.129e14          # effective FLOP/s of the projections + MLP (incl. norms, rope, launches)
H200_ATTENTION_FLOPS = 6.530e14       # effective FLOP/s of causal attention (QK^T and PV)
# decode ms/token = bytes read (weights + KV at that length) / H200_DECODE_BYTES_PER_S + H200_DECODE_STEP_MS
H200_DECODE_BYTES_PER_S = 4.441e12
H200_DECODE_STEP_MS = 0.912
# host KV crosses PCIe once per decode step (or is attended where it lives): pinned host->device copy rate
H200_H2D_BYTES_PER_S = 55.4e9         # ../shared/ANCHORS.md, 2 GiB pinned copies
# with the CPU attending part of the host KV where it lives (convert's cpu_attention), the host part of a
# step reads at H2D + this: fitted to 131,072 tokens all on the host (177 ms, host_decode_h200.md); at
# 524,288 it predicts 695 ms for a measured 803 (offload_h200.md, one step after two warm-ups)
H200_SPLIT_CPU_BYTES_PER_S = 44e9
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


@dataclass(frozen=True)
class Calibration:
    """Allocations beyond the weights that the shapes do not give: the planner adds
    ``offset + (scale - 1) x (residual stream + KV + staging + chunk work buffers)``."""

    offset: int
    scale: float = 1.0
    source: str = ""

    def overhead(self, shapes: int) -> int:
        return self.offset + int((self.scale - 1.0) * shapes)


CUDA_CALIBRATION = Calibration(_RUNTIME_FIXED, 1.0, "H200 rows, bench/results/model_h200.jsonl")
# CPU: RSS growth of prefills beyond the post-load RSS vs the shapes, fitted on two runs (SmolLM2-135M
# shape, fp32, 2 cores, glibc malloc, torch 2.14): 2048 tokens chunk 512 measured 173.1 MiB (shapes
# 149.3 MiB), 8192 tokens chunk 1024 measured 493.2 MiB (shapes 438.1 MiB). The offset is first-call
# runtime memory (oneDNN, the attention kernel's per-thread buffers); the scale is malloc retention:
# freed chunk temporaries of varying sizes that later KV buffers cannot reuse. Shape-dependent: a
# 6-layer random Llama (hidden 512, 8 KV heads) grew by only 0.9-1.04x its shapes, which this default
# over-predicts by up to 25%; calibrate() measures the model at hand.
CPU_CALIBRATION = Calibration(8 << 20, 1.108, "2 SmolLM2-shape CPU prefills (fp32, glibc malloc)")

CHUNK_FLOOR = 1024
CHUNK_CAP = 8192  # 16384 was measured 3% faster at 131k and equal at 262k, but the allocator then
#                   reserved 30.0 GiB for 18.6 GiB allocated at 131k (8192: 18.3 for 17.7): bench/results/bench_h200.md
_OFFLOAD_CHUNK_CAP = 8192   # with host offload the chunk is not grown past the measured default


@dataclass(frozen=True)
class ChunkLimits:
    """The chunk sizes a plan chooses from: powers of two in [floor, cap] (offload_cap with host KV)."""

    floor: int
    cap: int
    offload_cap: int


# CUDA: below the floor GEMM efficiency falls; the cap keeps clear of int32 / very-large-M limits.
# CPU: the cap is convert()'s long-standing CPU default (a larger chunk costs memory; no CPU
# measurement shows it faster); the floor 256: below it fp32 GEMMs ran far slower (2-core EPYC,
# [M, 576] x [576, 1536]: 3.6 GFLOP/s at M=64, 22 at 256, 30 at 1024, a shared, noisy machine).
CHUNK_LIMITS = {"cuda": ChunkLimits(CHUNK_FLOOR, CHUNK_CAP, _OFFLOAD_CHUNK_CAP),
                "cpu": ChunkLimits(256, 1024, 1024)}

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
    return _decode_growth(_round_up(seq_len + _PREFILL_HEADROOM), seq_len + decode_tokens)


def _decode_growth(cap: int, needed: int) -> tuple[int, int]:
    """(capacity, capacity before the last growth) once one-token steps have reached ``needed``."""
    prev = cap
    while cap < needed:
        prev, cap = cap, max(_round_up(cap + 1), _round_up(int(cap * _GROWTH)))
    return cap, prev


def grown_capacity(capacity: int, needed: int, headroom: int) -> int:
    """A buffer's capacity after a call reserves ``needed`` positions (cache.KVBuffers.reserve)."""
    if capacity >= needed:
        return capacity
    cap = _round_up(needed + headroom)
    return max(cap, _round_up(int(capacity * _GROWTH))) if capacity else cap


def work_bytes(shape: Shape, rows: int, batch: int, elt: int) -> ChunkWork:
    """Chunk work-buffer bytes for ``rows`` rows (see the module docstring)."""
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
    return ChunkWork(activation=act, block=block, kv_only=kv_only)


# ---- time model -----------------------------------------------------------------------------------------
def prefill_flops(shape: Shape, seq_len: int, batch: int = 1, past: int = 0) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) of a prefill of ``seq_len`` tokens after ``past`` cached ones."""
    linear = 2.0 * batch * seq_len * shape.layers * shape.layer_linear_params() + 2.0 * batch * shape.hidden * shape.vocab
    per_pair = 4.0 * shape.n_q * shape.head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    attn = 0.0
    s, p = float(seq_len), float(past)
    for w in shape.windows:
        if w is None or w >= seq_len + past:
            pairs = s * (s + 1) / 2 + s * p
        else:  # the windowed path computes a dense band per chunk: about S * (window + chunk/2) pairs
            first = max(0.0, min(s, w - p))  # queries still inside the first window
            pairs = first * (first + 1) / 2 + first * p + (s - first) * w
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
    chunk_size: int | None                 # the smallest chunk of the schedule; None: no chunk size fits
    breakdown_chunk: int                   # the breakdown's chunk when none fits
    kv_capacity: int                       # positions per layer buffer
    resident_layers: list[int]             # layers whose K, V stay on the device
    host_layers: list[int]                 # layers whose K, V would live in pinned host memory
    device_breakdown: dict[str, int]       # predicted peak device bytes (on the CPU: peak RSS) by part
    host_breakdown: dict[str, int]         # predicted host bytes by part (CUDA only)
    device_memory: int
    host_memory: int
    prefill_seconds: float | None          # None on the CPU (no CPU rates measured)
    decode_ms_per_token: float | None
    decode_seconds: float | None
    fits: bool
    reason: str
    offload_available: bool = True         # the host-offload engine is built into this install
    allow_offload: bool = True
    rates_from: str = RATES_FROM
    notes: list[str] = field(default_factory=list)
    chunk_schedule: list[int] | None = None  # per layer, non-increasing; None when nothing fits
    peak_layer: int = 0                    # the layer where the predicted peak occurs
    device: str = "cuda"                   # "cuda" or "cpu"
    past: int = 0                          # positions cached before the call (a continuation)
    calibration: Calibration = CUDA_CALIBRATION
    shape_bytes: int = 0                   # the loop's allocations at the peak from the shapes alone

    @property
    def device_bytes(self) -> int:
        return sum(self.device_breakdown.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host_breakdown.values())

    @property
    def peak_alloc_beyond_weights(self) -> int:
        """What torch.cuda.max_memory_allocated() - weights should read after the run; on the CPU,
        the peak RSS less the process baseline and the weights."""
        skip = {"weights", "allocator margin", "process baseline"}
        return sum(v for k, v in self.device_breakdown.items() if k not in skip)

    def chunks_text(self) -> str:
        if self.chunk_schedule is None:
            return f"no chunk size fits (shown: chunk {self.breakdown_chunk})"
        if len(set(self.chunk_schedule)) == 1:
            return f"chunk size {self.chunk_size}"
        return f"chunk sizes {describe(self.chunk_schedule)}"

    def table(self) -> str:
        def g(n: int) -> str:
            return f"{n / GiB:10.2f}"

        cpu = self.device == "cpu"
        after = f" after {self.past:,} cached" if self.past else ""
        head = (f"chunkinfer plan: {self.model_type}, {self.seq_len:,} tokens{after} x batch {self.batch}, "
                f"{self.dtype}" + (" on the CPU" if cpu else ""))
        where = (f"KV layers {len(self.resident_layers)} in process memory" if cpu else
                 f"KV layers resident {len(self.resident_layers)}, on host {len(self.host_layers)}")
        lines = [head, f"{self.chunks_text()}, KV capacity {self.kv_capacity:,} positions/layer, {where}", "",
                 f"{'process (peak RSS)' if cpu else 'device (peak)':<34}{'GiB':>10}"]
        lines += [f"  {k:<32}{g(v)}" for k, v in self.device_breakdown.items()]
        lines += [f"  {'total':<32}{g(self.device_bytes)}", f"  {'available':<32}{g(self.device_memory)}", ""]
        if not cpu:
            lines += [f"{'host':<34}{'GiB':>10}"]
            lines += [f"  {k:<32}{g(v)}" for k, v in self.host_breakdown.items()]
            lines += [f"  {'total':<32}{g(self.host_bytes)}", f"  {'available':<32}{g(self.host_memory)}", ""]
        if self.prefill_seconds is None:
            lines += ["times: not predicted on the CPU (no CPU rates measured)", ""]
        else:
            lines += [f"prefill   {self.prefill_seconds:10.2f} s",
                      f"decode    {self.decode_ms_per_token:10.2f} ms/token"
                      + (f" ({self.decode_seconds:.2f} s in all)" if self.decode_seconds else ""),
                      f"(times: {self.rates_from})", ""]
        lines += [f"fits: {'yes' if self.fits else 'no'}" + ("" if self.fits else f": {self.reason}")]
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


def _chunk_candidates(seq_len: int, cap: int = CHUNK_CAP, floor: int = CHUNK_FLOOR) -> list[int]:
    """Powers of two in [floor, cap], at most seq_len rounded up to a power of two; largest first."""
    top = max(floor, 1 << max(0, (seq_len - 1).bit_length()))
    out, c = [], floor
    while c <= min(cap, top):
        out.append(c)
        c *= 2
    return out[::-1]


def _slack(beyond_weights: int) -> int:
    return _CUDA_CONTEXT + max(_ALLOCATOR_SLACK, int(_ALLOCATOR_SLACK_FRACTION * beyond_weights))


def device_kind(device) -> str:
    """'cuda' or 'cpu' from a string or torch.device."""
    kind = device.type if isinstance(device, torch.device) else device
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu' (or a torch.device of those), got {device!r}")
    return kind


def _process_baseline(value, kind: str, model_type: str) -> int:
    if kind != "cpu":
        if value is not None:
            raise ValueError("process_baseline is part of the CPU prediction (device='cpu')")
        return 0
    if value is None:
        from .rss import fresh_process_baseline

        return fresh_process_baseline("gemma3_text" if model_type == "gemma3" else model_type)
    return _positive_int(value, "process_baseline", minimum=0)


def plan(config, seq_len: int, *, batch: int = 1, dtype=torch.bfloat16, device_memory=None, host_memory=None,
         decode_tokens: int = 0, chunk_size: int | None = None, allow_offload: bool = True,
         resident_layers: int | None = None, device="cuda", past: int = 0, past_capacity: int | None = None,
         process_baseline: int | None = None, calibration: Calibration | None = None,
         last_layer_block: bool = False, logits_rows: int = 1, cpu_attention: bool = True) -> Plan:
    """Predict device / host memory, chunk sizes and times of a prefill of ``seq_len`` tokens (plus
    ``decode_tokens`` generated ones) with chunkinfer. Memories: bytes or strings like "139GiB".

    Chunks: per layer the largest power of two in the device's ``CHUNK_LIMITS`` whose peak fits,
    non-increasing as the KV grows (``Plan.chunk_schedule``; ``Plan.chunk_size`` is its smallest);
    ``chunk_size`` fixes one chunk for every layer instead. The prefill is generate()'s (logits of
    the last position); ``last_layer_block``: the last layer computes every row (loss, hidden states);
    ``logits_rows``: rows of logits the call returns (a model(ids) call: all of them).

    KV placement: every layer resident when that fits; else, with ``allow_offload``, the first layers
    resident and the rest in pinned host memory, as many resident as fit. ``resident_layers`` fixes
    that count instead (the chunk must then fit with it).

    ``past``: positions already cached (a continuation), in buffers of ``past_capacity`` positions
    (default: as a prefill of ``past`` tokens leaves them). ``calibration``: a measured correction
    (calibrate.py); default ``CUDA_CALIBRATION`` / ``CPU_CALIBRATION``. ``cpu_attention``: decode
    steps attend part of the host KV on the CPU (convert's default), else they stream all of it.

    ``device="cpu"``: predicts the process's peak RSS. ``device_memory`` is then the RSS the process
    may reach (default: physical memory), nothing is offloaded, and ``process_baseline`` is the RSS
    before the weights (default: measured in a fresh interpreter, see rss.fresh_process_baseline)."""
    seq_len = _positive_int(seq_len, "seq_len")
    batch = _positive_int(batch, "batch")
    decode_tokens = _positive_int(decode_tokens, "decode_tokens", minimum=0)
    past = _positive_int(past, "past", minimum=0)
    logits_rows = _positive_int(logits_rows, "logits_rows", minimum=0)
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    if not isinstance(allow_offload, bool):
        raise TypeError(f"allow_offload must be a bool, got {type(allow_offload).__name__}")
    if not isinstance(cpu_attention, bool):
        raise TypeError(f"cpu_attention must be a bool, got {type(cpu_attention).__name__}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a chunkinfer Calibration, got {type(calibration).__name__}")
    kind = device_kind(device)
    cpu = kind == "cpu"
    offload_available = offload_engine_available() and not cpu
    allow_offload = allow_offload and offload_available
    dt = parse_dtype(dtype)
    elt = torch.empty((), dtype=dt).element_size()
    config = load_config(config)
    shape = Shape.from_config(config)
    L = shape.layers
    if past_capacity is None:
        past_capacity = kv_capacity(past)[0] if past else 0
    past_capacity = _positive_int(past_capacity, "past_capacity", minimum=0)
    if past and past_capacity < past:
        raise ValueError(f"past_capacity ({past_capacity}) must hold the {past} cached positions")
    if resident_layers is not None:
        resident_layers = _positive_int(resident_layers, "resident_layers", minimum=0)
        if resident_layers > L:
            raise ValueError(f"resident_layers must be <= the model's {L} layers, got {resident_layers}")
        if resident_layers < L and cpu:
            raise ValueError("resident_layers < layers offloads KV to host memory: not a CPU plan's choice")
        if resident_layers < L and not offload_engine_available():
            raise ValueError("resident_layers < layers needs the KV offload engine, which this build lacks")
    baseline = _process_baseline(process_baseline, kind, shape.model_type)
    if device_memory is not None:
        dev = parse_memory(device_memory, "device_memory")
    else:
        dev = _default_host_memory() if cpu else _default_device_memory()
    host = parse_memory(host_memory, "host_memory") if host_memory is not None else _default_host_memory()
    cal = calibration or (CPU_CALIBRATION if cpu else CUDA_CALIBRATION)

    weights = shape.weight_params() * elt
    residual = batch * seq_len * shape.hidden * elt + 2 * batch * seq_len * 8  # + int64 ids, positions
    end = past + seq_len
    per_position = batch * shape.kv_bytes_per_token_layer(elt)
    call_cap = grown_capacity(past_capacity, end, _PREFILL_HEADROOM if seq_len > 1 else 0)
    cap, prev_cap = _decode_growth(call_cap, end + decode_tokens)
    layer_kv = per_position * cap
    growth_kv = per_position * prev_cap if cap != prev_cap else 0
    works: dict[int, ChunkWork] = {}

    def work_of(c: int) -> ChunkWork:
        if c not in works:
            works[c] = work_bytes(shape, min(c, seq_len), batch, elt)
        return works[c]

    # the LM head after the loop: the returned logits and one head chunk's normed rows and logits
    head_rows = head_chunk_rows(seq_len, shape.vocab)  # at most: the loop's chunk caps it too
    logits = batch * (logits_rows * shape.vocab + head_rows * (shape.vocab + shape.hidden)) * elt

    def memory(n_resident: int) -> CallMemory:
        n_host = L - n_resident
        # offload: two layers' K, V staged on the device (the one computed, the one draining to the host)
        staging = min(2, n_host) * layer_kv if n_host else 0
        return CallMemory(kv_old=[per_position * past_capacity] * n_resident + [0] * n_host,
                          kv_new=[layer_kv] * n_resident + [0] * n_host, fixed=residual + staging + growth_kv,
                          work=work_of, last_layer_block=last_layer_block, tail=logits if logits_rows > 1 else 0)

    def total(alloc: int) -> int:
        over = cal.overhead(alloc)
        return baseline + weights + alloc + over + (0 if cpu else _slack(alloc + over))

    def fits(alloc: int) -> bool:
        return total(alloc) <= dev

    def schedule(n_resident: int, cands: list[int]) -> list[int] | None:
        return choose(memory(n_resident), cands, fits)

    def parts_of(n_resident: int, chunks: list[int]) -> tuple[dict, int, int]:
        n_host = L - n_resident
        alloc, layer = memory(n_resident).peak(chunks)
        staging = min(2, n_host) * layer_kv if n_host else 0
        kv = n_resident * layer_kv + growth_kv
        parts = {"process baseline": baseline} if cpu else {}
        parts |= {"weights": weights, "residual stream": residual, ("KV cache" if cpu else "KV resident"): kv}
        if n_host:
            parts["KV offload staging"] = staging
        parts["chunk work buffers"] = alloc - residual - staging - kv  # net of KV not yet allocated then
        over = cal.overhead(alloc)
        if cpu:
            parts["runtime and malloc overhead"] = over
        else:
            parts["runtime fixed"] = over
            parts["allocator margin"] = _slack(alloc + over)
        return parts, layer, alloc

    limits = CHUNK_LIMITS[kind]
    candidates = [chunk_size] if chunk_size is not None else _chunk_candidates(seq_len, limits.cap, limits.floor)
    offload_cands = candidates if chunk_size is not None else (
        [c for c in candidates if c <= limits.offload_cap] or candidates[-1:])
    notes: list[str] = []
    n_resident = L if resident_layers is None else resident_layers
    chunks = schedule(n_resident, candidates if n_resident == L else offload_cands)
    if chunks is None and resident_layers is None and allow_offload:
        # the largest chunk that fits with every layer streamed, then as many resident layers as fit with it
        streamed = schedule(0, offload_cands)
        if streamed is not None:
            keep = [c for c in offload_cands if c >= min(streamed)]
            n_resident, chunks = 0, streamed
            while n_resident + 1 < L and (more := schedule(n_resident + 1, keep)) is not None:
                n_resident, chunks = n_resident + 1, more
        else:
            n_resident = 0
    report_chunk = min(chunks) if chunks is not None else candidates[-1]
    peak_chunks = chunks if chunks is not None else [report_chunk] * L
    parts, peak_layer, shape_bytes = parts_of(n_resident, peak_chunks)
    n_host = L - n_resident
    host_kv = n_host * layer_kv
    # the arena hands out exact regions from 1 GiB slabs: at most one slab's tail is unused
    host_parts = {} if cpu else {"KV on host": host_kv, "pinned arena slab tail": GiB if n_host else 0}
    host_usable = int(host * _HOST_USABLE)

    need_dev = sum(parts.values())
    reason = ""
    if chunks is None:
        what = f"chunk {candidates[0]}" if chunk_size is not None else f"the smallest chunk ({candidates[-1]})"
        mem = "the process" if cpu else "device"
        tail = f"only {dev:,} bytes ({dev / GiB:.2f} GiB) are available"
        if cpu:
            reason = f"{mem} needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) of RSS with {what}, but {tail}"
        elif resident_layers is not None:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} and {n_resident} "
                      f"layers' KV resident, but {tail}")
        elif allow_offload:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} even with every "
                      f"layer's KV on the host, but {tail}")
        else:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} and every layer's "
                      f"KV resident, but {tail}")
            alt = plan(config, seq_len, batch=batch, dtype=dt, device_memory=dev, host_memory=host,
                       decode_tokens=decode_tokens, chunk_size=chunk_size, past=past, past_capacity=past_capacity,
                       calibration=calibration, last_layer_block=last_layer_block) if offload_available else None
            if alt is None:
                reason += "; this build has no KV offload engine"
            elif alt.fits:
                reason += (f"; with KV offload (allow_offload=True) {len(alt.host_layers)} of {L} layers' KV would "
                           "go to pinned host memory and it fits")
            else:
                reason += "; KV offload would not fit either"
    elif n_host and sum(host_parts.values()) > host_usable:
        hb = sum(host_parts.values())
        reason = (f"host needs {hb:,} bytes ({hb / GiB:.2f} GiB) for {n_host} layers' KV (the device holds "
                  f"{n_resident} of {L} layers), but only "
                  f"{host_usable:,} bytes ({host_usable / GiB:.2f} GiB, {_HOST_USABLE:.0%} of {host / GiB:.2f} GiB) "
                  "are usable")
    fits_all = not reason
    if fits_all and n_host:
        notes.append(f"layers {n_resident}..{L - 1} keep their KV in pinned host memory (kv_offload=True); "
                     + ("each decode step attends part of it on the CPU and streams the rest to the device"
                        if cpu_attention else "each decode step streams it to the device once"))
    if chunks is not None and len(set(chunks)) > 1:
        notes.append("the chunk shrinks layer by layer as the KV grows (peak at layer "
                     f"{peak_layer}); convert() with chunk_size=None runs this schedule")
    if cpu:
        notes.append("peak RSS = process baseline (" + ("given" if process_baseline is not None else
                     "a fresh interpreter with torch, transformers, chunkinfer and the modeling code imported")
                     + ") + weights + the loop's allocations; a model loader's own peak (e.g. GGUF dequantisation) "
                     "and anything else the process holds are not included")
    elif dt != torch.bfloat16:
        notes.append("times are bf16 measurements; other dtypes are not calibrated")
    if any(shape.windows):
        notes.append("sliding-window layers keep every position in the current cache (counted in full)")

    prefill_s = per_tok = decode_s = None
    if not cpu:
        lin, att = prefill_flops(shape, seq_len, batch, past)
        prefill_s = lin / H200_LINEAR_FLOPS + att / H200_ATTENTION_FLOPS
        mean = end + decode_tokens // 2
        length = int(end + decode_tokens / 2) if decode_tokens else end
        per_tok = decode_bytes(shape, length, batch, elt) * 1e3 / H200_DECODE_BYTES_PER_S + H200_DECODE_STEP_MS
        # the host part crosses PCIe each step (or part of it is attended by the CPU meanwhile),
        # overlapped with the resident part's reads
        host_rate = H200_H2D_BYTES_PER_S + (H200_SPLIT_CPU_BYTES_PER_S if cpu_attention else 0.0)
        per_tok += n_host * batch * mean * shape.kv_bytes_per_token_layer(elt) * 1e3 / host_rate
        decode_s = per_tok * decode_tokens / 1e3
    return Plan(model_type=shape.model_type, seq_len=seq_len, batch=batch, dtype=_dtype_name(dt),
                chunk_size=min(chunks) if chunks is not None else None, breakdown_chunk=report_chunk,
                kv_capacity=cap, resident_layers=list(range(n_resident)), host_layers=list(range(n_resident, L)),
                device_breakdown=parts, host_breakdown=host_parts, device_memory=dev, host_memory=host,
                prefill_seconds=prefill_s, decode_ms_per_token=per_tok, decode_seconds=decode_s, fits=fits_all,
                reason=reason, allow_offload=allow_offload, offload_available=offload_available, notes=notes,
                chunk_schedule=chunks, peak_layer=peak_layer, device=kind, past=past, calibration=cal,
                shape_bytes=shape_bytes,
                rates_from="no CPU rates measured" if cpu else RATES_FROM)
