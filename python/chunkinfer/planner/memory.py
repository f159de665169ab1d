"""The memory model: what the layer loop allocates, from the shapes, and what the runtime adds.

* the residual stream [B, S, H] in the model dtype (plus the int64 token ids and positions),
* per-layer K, V buffers [B, Hkv, cap, D], sized by the cache's own rule (kv/device_layer.py: ``capacity_for``;
  after a prefill cap = round_up(S + PREFILL_HEADROOM, ALIGN)), so a plan and a run agree on every capacity,
* chunk work buffers of C rows (``work_bytes``): the MLP activation buffer [C, intermediate] kept for the
  layer, and per block the larger of the attention phase (q, k, v, block and prefix outputs and their
  merge) and the MLP phase (gate, up, down, o_proj output). The last layer only writes K, V for all but
  the last rows, so its own KV is allocated while only the small K, V-only temporaries are alive.

Beyond these shapes, a ``Calibration`` per device: allocations that do not scale with the shapes
(workspaces; on the CPU also malloc's retention) as ``offset + (scale - 1) x shapes``. ``calibrate()``
(calibrate.py) measures it for one model on a short run and keeps it on that converted model.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kv.device_layer import PREFILL_HEADROOM, capacity_for
from ..kv.ring import held_capacity, ring_capacity
from .schedule import ChunkWork
from .shape import Shape
from .units import GiB

RUNTIME_FIXED = 128 << 20  # allocations beyond weights that do not scale with S (cuBLAS workspaces,
#                             decode CUDA-graph pools, rope tables): calibrated on the H200 rows
CUDA_CONTEXT = 512 << 20   # CUDA context + kernels: outside torch's allocator, inside the device total
_ALLOCATOR_SLACK = 3 * GiB // 2  # reserved - allocated: largest measured gap 1.48 GiB (32k row)
_ALLOCATOR_SLACK_FRACTION = 0.02  # ... or this fraction of the allocations beyond weights, if larger
HOST_USABLE = 0.9          # share of host memory the pinned KV arena may take


@dataclass(frozen=True)
class Calibration:
    """Allocations beyond the weights that the shapes do not give: the planner adds
    ``offset + (scale - 1) x (residual stream + KV + staging + chunk work buffers)``."""

    offset: int
    scale: float = 1.0
    source: str = ""

    def overhead(self, shapes: int) -> int:
        return self.offset + int((self.scale - 1.0) * shapes)


CUDA_CALIBRATION = Calibration(RUNTIME_FIXED, 1.0, "H200 rows, bench/results/model_h200.jsonl")
# CPU: RSS growth of prefills beyond the post-load RSS vs the shapes, fitted on two runs (SmolLM2-135M
# shape, fp32, 2 cores, glibc malloc, torch 2.14): 2048 tokens chunk 512 measured 173.1 MiB (shapes
# 149.3 MiB), 8192 tokens chunk 1024 measured 493.2 MiB (shapes 438.1 MiB). The offset is first-call
# runtime memory (oneDNN, the attention kernel's per-thread buffers); the scale is malloc retention:
# freed chunk temporaries of varying sizes that later KV buffers cannot reuse. Shape-dependent: a
# 6-layer random Llama (hidden 512, 8 KV heads) grew by only 0.9-1.04x its shapes, which this default
# over-predicts by up to 25%; calibrate() measures the model at hand.
CPU_CALIBRATION = Calibration(8 << 20, 1.108, "2 SmolLM2-shape CPU prefills (fp32, glibc malloc)")


def kv_capacity(seq_len: int, decode_tokens: int = 0) -> tuple[int, int]:
    """(capacity after prefill + decode, capacity before the last growth) in positions, as the cache grows it."""
    return decode_growth(capacity_for(0, seq_len, PREFILL_HEADROOM), seq_len + decode_tokens)


def decode_growth(cap: int, needed: int) -> tuple[int, int]:
    """(capacity, capacity before the last growth) once one-token steps have reached ``needed``."""
    prev = cap
    while cap < needed:
        prev, cap = cap, capacity_for(cap, cap + 1, 0)
    return cap, prev


def layer_positions(window: int | None, end: int, cap: int) -> int:
    """Positions a layer's K, V buffer holds once ``end`` are cached: a full-attention layer the cache's
    capacity ``cap``, a sliding-window layer's ring its window (kv/ring.py: ``held_capacity``)."""
    return cap if window is None else held_capacity(window, end)


def ring_extra_positions(shape: Shape, end: int, chunk: int) -> int:
    """Positions the largest ring holds beyond its window while its layer runs a chunk (one layer at a
    time: the ring shrinks back after its layer)."""
    return max((ring_capacity(w, end, chunk) - held_capacity(w, end) for w in shape.windows if w), default=0)


def _moe_block(shape: Shape, rows: int, elt: int) -> int:
    """A mixture-of-experts MLP's temporaries for ``rows`` rows (loop/moe.py): router logits and their
    softmax (fp32), the sorted (row, slot) indices, and for the largest expert group (at most every
    row) its rows, gate|up, activation, output and weighted output, plus the zeroed output."""
    h, i = shape.hidden, shape.expert_intermediate
    return rows * (2 * shape.experts * 4 + 3 * shape.top_k * 8 + (3 * h + 3 * i) * elt + h * elt)


def work_bytes(shape: Shape, rows: int, batch: int, elt: int) -> ChunkWork:
    """Chunk work-buffer bytes for ``rows`` rows (see the module docstring)."""
    b, c = batch, rows
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    q = b * c * shape.n_q * shape.head_dim * elt          # [B, Hq, C, D] in the model dtype
    kv1 = b * c * shape.n_kv * shape.head_dim * elt       # one of k, v for the chunk
    act = b * c * i * elt if not all(shape.sparse or [False]) else 0  # the reused dense MLP activation buffer
    lse = b * shape.n_q * c * 4                           # fp32 log-sum-exp [B, Hq, C]
    merge = q + lse                                       # merge_attn_states' output and lse
    qkv_live = b * c * (shape.n_q + 2 * shape.n_kv) * shape.head_dim * elt if shape.fused else 2 * kv1
    attention = q + 2 * kv1 + 2 * q + 2 * lse + merge     # q, k, v, block + prefix outputs, merge
    attention_block = q + 2 * kv1 + 2 * q + q  # q, k, v, K/V repeated to Hq, block output
    band = max((b * (shape.n_q // shape.n_kv) * c * (c + w) for w in shape.windows if w), default=0)
    windowed = q + 2 * kv1 + band + q
    mlp = q + qkv_live + q + 2 * b * c * h * elt + 2 * b * c * i * elt  # + attn out, o, down, gate, up
    if any(shape.sparse):
        mlp = max(mlp, q + qkv_live + q + b * c * h * elt + _moe_block(shape, b * c, elt))
    block = max(attention, attention_block, windowed, mlp)
    kv_only = b * c * h * elt + 2 * kv1 + 3 * kv1 + b * v * elt + b * h * elt  # norm, k, v, rope, logits
    return ChunkWork(activation=act, block=block, kv_only=kv_only)


def slack(beyond_weights: int) -> int:
    return CUDA_CONTEXT + max(_ALLOCATOR_SLACK, int(_ALLOCATOR_SLACK_FRACTION * beyond_weights))

