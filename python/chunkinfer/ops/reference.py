"""The plain-PyTorch definition of every chunkinfer op.

Tests compare the kernels against these evaluated in float64; when the compiled extension cannot
be loaded, ops.py registers these under the same op names so model code behaves the same.
Computation runs in at least fp32 (float64 inputs stay float64); results take the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _gate_up(x: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if up is not None:
        return x, up
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def silu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = _gate_up(x, up)
    ct = _compute_dtype(x)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    gate, up = _gate_up(x, up)
    ct = _compute_dtype(x)
    return (F.gelu(gate.to(ct), approximate=approximate) * up.to(ct)).to(x.dtype)


def _normalise(v: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, dtype: torch.dtype) -> torch.Tensor:
    """v in the compute dtype; mirrors HF's rounding: Llama rounds the normalised value to the
    input dtype before the weight multiply, Gemma multiplies by (1 + w) in fp32 and rounds once."""
    inv = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (v * inv * (1.0 + weight.to(v.dtype))).to(dtype)
    return ((v * inv).to(dtype).to(v.dtype) * weight.to(v.dtype)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    return _normalise(x.to(_compute_dtype(x)), weight, eps, gemma, x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form: returns (normalised, new residual); the op writes them into x and residual."""
    new_residual = _add(residual, x)
    return rms_norm(new_residual, weight, eps, gemma), new_residual


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b in the compute dtype, rounded once to a's dtype (the residual add)."""
    ct = _compute_dtype(a)
    return (a.to(ct) + b.to(ct)).to(a.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     starts: torch.Tensor | None = None, scale: float | None = None,
                     window: int = 0, split_keys: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new tokens per sequence over a preallocated KV cache.

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, cap, D]; seq_lens, starts [B] (int). Query t of
    sequence b sits at position pos = seq_lens[b] - T + t and sees the keys j with
    starts[b] <= j <= pos (and pos - window < j when window > 0); query head h reads kv head
    h // (Hq // Hkv). Key j lives at cache slot j: with window 0 a seq_len beyond the capacity is
    read as the capacity; with window > 0 the cache may be a ring, key j at slot j % cap (the caller
    keeps cap >= window + T - 1). Returns out [B, Hq, T, D] in q's dtype and the natural-log
    log-sum-exp lse [B, Hq, T] (fp32, or float64 for float64 inputs); a query that sees no key gets
    out 0 and lse -inf. Only the slots of the keys some query sees are read. ``split_keys`` changes
    the kernels' order of summation, not the result: the exact math ignores it.
    """
    B, Hq, T, D = q.shape
    Hkv, cap = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    ct = _compute_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=ct, device=q.device)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=ct, device=q.device)
    lens = seq_lens.tolist()
    firsts = starts.tolist() if starts is not None else [0] * B
    for b in range(B):
        length = max(lens[b], 0) if window > 0 else min(max(lens[b], 0), cap)
        start = min(max(firsts[b], 0), length)
        lo = max(start, length - T - window + 1) if window > 0 else start
        if lo >= length:
            continue
        keys = torch.arange(lo, length, device=q.device)
        slots = keys % cap
        pos = torch.arange(length - T, length, device=q.device)
        allowed = (keys[None, :] >= start) & (keys[None, :] <= pos[:, None])  # [T, n]
        if window > 0:
            allowed &= keys[None, :] > pos[:, None] - window
        k = k_cache[b][:, slots].to(ct).repeat_interleave(g, dim=0)  # [Hq, n, D]
        v = v_cache[b][:, slots].to(ct).repeat_interleave(g, dim=0)
        s = torch.einsum("htd,hnd->htn", q[b].to(ct), k) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hq, T]
        seen = torch.isfinite(row_lse)
        p = torch.exp(s - torch.where(seen, row_lse, 0)[..., None])
        out[b] = torch.where(seen[..., None], p @ v, 0)
        lse[b] = row_lse
    return out.to(q.dtype), lse


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                      lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets: out [..., D], lse [...].

    A segment with lse -inf contributes nothing (its out is never used); both -inf gives out 0 and
    lse -inf; +inf segments share the result evenly. Returns out in out_a's dtype and lse in fp32
    (float64 for float64 inputs).
    """
    ct = torch.promote_types(_compute_dtype(out_a), lse_a.dtype)
    la, lb = lse_a.to(ct), lse_b.to(ct)
    mx = torch.maximum(la, lb)
    ref = torch.where(torch.isfinite(mx), mx, 0)
    ea, eb = torch.exp(la - ref), torch.exp(lb - ref)
    inf = mx == float("inf")
    ea = torch.where(inf, (la == float("inf")).to(ct), ea)
    eb = torch.where(inf, (lb == float("inf")).to(ct), eb)
    total = ea + eb
    wa = torch.where(total > 0, ea / total, 0)[..., None]
    wb = torch.where(total > 0, eb / total, 0)[..., None]
    out = torch.where(wa != 0, wa * out_a.to(ct), 0) + torch.where(wb != 0, wb * out_b.to(ct), 0)
    lse = torch.where(inf, mx, torch.where(total > 0, ref + torch.log(total), float("-inf")))
    return out.to(out_a.dtype), lse


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated on its first R dims by cos, sin [1 or B, T, R] (sin's first half negated):
    x * cos + roll(x, R/2) * sin, in the compute dtype, rounded once to x's dtype."""
    ct = _compute_dtype(x)
    r = cos.shape[-1]
    c, s = cos.to(ct).unsqueeze(2), sin.to(ct).unsqueeze(2)
    xr = x[..., :r].to(ct)
    out = x.to(ct).clone()
    out[..., :r] = xr * c + xr.roll(r // 2, -1) * s
    return out.to(x.dtype)


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x w^T (+ b) in the compute dtype, rounded once to x's dtype (as F.linear rounds it)."""
    ct = _compute_dtype(x)
    return F.linear(x.to(ct), w.to(ct), None if b is None else b.to(ct)).to(x.dtype)


def gemv_prologue(x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0, gemma: bool = False,
                  add: torch.Tensor | None = None, residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """The gemv ops' optional prologue: the residual x (+ add) goes to residual_out (if given); returns
    h, rms_norm of the residual when norm_weight is given, else the residual itself."""
    residual = x if add is None else _add(x, add)
    if residual_out is not None:
        residual_out.copy_(residual)
    return residual if norm_weight is None else rms_norm(residual, norm_weight, eps, gemma)


def gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, gemma: bool = False,
         add: torch.Tensor | None = None, residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """The projections of h [..., K] by each weight [M_i, K] (+ its bias), side by side: [..., sum M_i];
    h from x by :func:`gemv_prologue`."""
    h = gemv_prologue(x, norm_weight, eps, gemma, add, residual_out)
    return torch.cat([_project(h, w, b) for w, b in zip(weights, biases)], dim=-1)


def gemv_act_and_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                     approximate: str = "none", norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                     gemma: bool = False, add: torch.Tensor | None = None,
                     residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """act(h gate^T) * (h up^T), each projection rounded to x's dtype first; h as in :func:`gemv`."""
    h = gemv_prologue(x, norm_weight, eps, gemma, add, residual_out)
    g, u = _project(h, gate), _project(h, up)
    return silu_and_mul(g, u) if activation == "silu" else gelu_and_mul(g, u, approximate)

