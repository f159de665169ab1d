"""The time model: FLOPs and bytes of a prefill and a decode step, and the device rates fitted to measurements.

Times are estimates for the device the rates were measured on (an H200, bf16, Llama-3.1-8B shape, chunk
8192); ``fit_prefill_rates`` / ``fit_decode_rates`` re-derive the constants from result rows
(tests/planner/test_plan.py checks them against bench/results/).
"""
from __future__ import annotations

from .shape import Shape

# ---- Measured device rates: NVIDIA H200, bf16, chunk 8192 --------------------------------------------
# Source: bench/results/model_h200.md (rows in bench/results/model_h200.jsonl), fitted with
# fit_prefill_rates / fit_decode_rates below on every "chunkinfer prefill" / "chunkinfer decode" row
# (least squares on the relative error; tests/planner/test_plan.py re-fits them and checks these values).
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


def prefill_flops(shape: Shape, seq_len: int, batch: int = 1, past: int = 0) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) of a prefill of ``seq_len`` tokens after ``past`` cached ones."""
    linear = 2.0 * batch * seq_len * shape.active_linear_params() + 2.0 * batch * shape.hidden * shape.vocab
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
    """Bytes one decode step reads: every weight but the embedding table (one row) and the experts no
    row chose, plus the K, V in view."""
    weights = shape.weight_params() - (0 if shape.tied else shape.vocab * shape.hidden)
    weights -= sum(shape.layer_linear_params(li) for li in range(shape.layers)) - shape.active_linear_params(batch)
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

