"""Attention of a block of queries against a layer's cached keys, without a dense mask on the fast paths.

Positions are cache indices: the block's queries sit at [q_start, q_start + c) and their own K, V are
already written there. ``key_starts[b]`` is the first key sequence b may see (its left padding);
``window`` is a sliding window (query i sees keys j with i - window < j <= i, as transformers masks it).
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops import reference
from .attention_backend import attention_with_lse, gqa_attention


def fold_gqa(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[B, Hq, M, D] -> [B, Hkv, g*M, D]: each KV group's query heads become one long query, so K, V are
    read once and never repeated (head h uses KV head h // g, as transformers' repeat_kv does)."""
    b, hq, m, d = q.shape
    return q.reshape(b, n_kv, (hq // n_kv) * m, d)


def unfold_gqa(x: torch.Tensor, n_q: int) -> torch.Tensor:
    """Inverse of fold_gqa for outputs [B, Hkv, g*M, D] or log-sum-exps [B, Hkv, g*M]."""
    b, hkv = x.shape[:2]
    m = x.shape[2] * hkv // n_q
    return x.reshape(b, n_q, m, *x.shape[3:])


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _merge(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge_attn_states op (float64, which the kernels do not take, by its reference)."""
    if out_a.dtype == torch.float64:
        return reference.merge_attn_states(out_a, lse_a, out_b, lse_b)
    # the op takes rows of one stride: cuDNN may return other layouts (then one chunk's rows are copied)
    return ops.merge_attn_states(out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(), lse_b.contiguous())


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention out [B, Hq, T, D] with a learned sink logit per head [Hq] in its softmax denominator
    (gpt-oss): one more partial, with out 0 and lse the sink, merged exactly by log-sum-exp."""
    b, hq, t = lse.shape
    sink_lse = sinks.to(lse.dtype)[None, :, None].expand(b, hq, t)
    return _merge(out, lse, torch.zeros_like(out), sink_lse)[0]


def _prefix_and_block(q, k, v, q_start: int, key_start: int, scale: float, offset: int = 0):
    """One batch group sharing key_start: keys [key_start, q_start) without mask, merged by LSE with the
    block's own causal part; k, v hold positions from ``offset``. Query rows before key_start (padding)
    get out 0 and lse -inf. Returns (out, lse)."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    first = max(0, key_start - q_start)  # first query row that is not padding
    qb = q[:, :, first:]
    kb = k[:, :, q_start + first - offset: q_start + c - offset]
    vb = v[:, :, q_start + first - offset: q_start + c - offset]
    lse = q.new_full((b, hq, c), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32))
    if qb.shape[2] == 0:
        return q.new_zeros(q.shape), lse
    o_blk, lse_blk = attention_with_lse(qb, _repeat_kv(kb, hq // hkv), _repeat_kv(vb, hq // hkv),
                                        causal=True, scale=scale)
    if key_start < q_start:
        o_pre, lse_pre = attention_with_lse(fold_gqa(qb, hkv), k[:, :, key_start - offset:q_start - offset],
                                            v[:, :, key_start - offset:q_start - offset], causal=False, scale=scale)
        o_blk, lse_blk = _merge(unfold_gqa(o_pre, hq), unfold_gqa(lse_pre, hq), o_blk, lse_blk)
    if first == 0:
        return o_blk, lse_blk
    out = q.new_zeros(q.shape)
    out[:, :, first:] = o_blk
    lse[:, :, first:] = lse_blk
    return out, lse


_MASKED_LSE_ROWS = 512  # query rows per score block of the masked attention with LSE


def _masked_with_lse(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a boolean mask [B, 1, M, N] and its LSE, by plain math in row blocks (the fused
    kernels with a mask return no LSE): scores [B, H, rows, N] in fp32 at most ``_MASKED_LSE_ROWS`` rows."""
    ct = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=ct, device=q.device)
    kt, vc = k.to(ct).transpose(-1, -2), v.to(ct)
    for r0 in range(0, q.shape[2], _MASKED_LSE_ROWS):
        r1 = min(r0 + _MASKED_LSE_ROWS, q.shape[2])
        scores = torch.matmul(q[:, :, r0:r1].to(ct), kt) * scale
        scores.masked_fill_(~mask[:, :, r0:r1], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        out[:, :, r0:r1] = torch.matmul(torch.exp(scores - row_lse[..., None]), vc).to(q.dtype)
        lse[:, :, r0:r1] = row_lse
    return out, lse


def _windowed(q, k, v, q_start: int, key_starts: list[int] | None, window: int, scale: float, offset: int = 0,
              want_lse: bool = False):
    """Sliding-window block: keys [lo, q_start + c) with a small [B, 1, c, keys] boolean band mask; k, v
    hold positions from ``offset`` (<= lo). Returns (out, lse or None)."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    lo = max(0, q_start - window + 1)
    hi = q_start + c
    qi = torch.arange(q_start, hi, device=q.device)[:, None]
    kj = torch.arange(lo, hi, device=q.device)[None, :]
    band = (kj <= qi) & (kj > qi - window)
    if key_starts is None:
        mask = band[None, None]
    else:
        starts = torch.tensor(key_starts, device=q.device)[:, None, None]
        # a padding query still sees itself, so no row is empty (an empty row would be NaN, and NaN
        # keys would poison later layers through 0 * NaN)
        mask = ((band[None] & (kj[None] >= starts)) | (kj == qi)[None])[:, None]
    g = hq // hkv
    mask = mask.repeat(1, 1, g, 1) if g > 1 else mask  # rows follow fold_gqa's (group, query) order
    kw, vw = k[:, :, lo - offset:hi - offset], v[:, :, lo - offset:hi - offset]
    if want_lse:
        out, lse = _masked_with_lse(fold_gqa(q, hkv), kw, vw, mask.expand(b, 1, -1, -1), scale)
        return unfold_gqa(out, hq), unfold_gqa(lse, hq)
    return unfold_gqa(gqa_attention(fold_gqa(q, hkv), kw, vw, scale=scale, attn_mask=mask), hq), None


def _decode_one(q, k, v, lo: int, end: int, scale: float, offset: int, want_lse: bool):
    """One query row per sequence over keys [lo, end) (k, v from ``offset``). Returns (out, lse or None)."""
    kr, vr = k[:, :, lo - offset:end - offset], v[:, :, lo - offset:end - offset]
    if not want_lse:
        return gqa_attention(q, kr, vr, scale=scale), None
    hq, hkv = q.shape[1], k.shape[1]
    out, lse = attention_with_lse(fold_gqa(q, hkv), kr, vr, causal=False, scale=scale)
    return unfold_gqa(out, hq), unfold_gqa(lse, hq)


def _attend(q, k, v, q_start: int, key_starts, window, scale: float, offset: int, want_lse: bool):
    c = q.shape[2]
    end = q_start + c
    if window is not None and c > 1 and end > window:
        return _windowed(q, k, v, q_start, key_starts, window, scale, offset, want_lse)
    win_start = 0 if window is None else max(0, end - window)
    if c == 1:  # decode: one fused GQA call over the key range, no mask
        if key_starts is None:
            return _decode_one(q, k, v, win_start, end, scale, offset, want_lse)
        # min(s, end - 1): a sequence still all padding sees itself rather than nothing (NaN)
        parts = [_decode_one(q[i:i + 1], k[i:i + 1], v[i:i + 1], max(min(s, end - 1), win_start), end, scale,
                             offset, want_lse) for i, s in enumerate(key_starts)]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts]) if want_lse else None
    if key_starts is None:
        return _prefix_and_block(q, k, v, q_start, 0, scale, offset)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for i, s in enumerate(key_starts):  # left padding: each sequence its own key range
        out[i:i + 1], lse[i:i + 1] = _prefix_and_block(q[i:i + 1], k[i:i + 1], v[i:i + 1], q_start, s, scale, offset)
    return out, lse


def first_key(q_start: int, window: int | None) -> int:
    """The first position a block starting at ``q_start`` may see (its window's start)."""
    return 0 if window is None else max(0, q_start - window + 1)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                    key_starts: list[int] | None, window: int | None, scale: float, *, key_offset: int = 0,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, c, D] (cache positions [q_start, q_start + c)) over the cached k, v
    [B, Hkv, q_start + c - key_offset, D] holding positions [key_offset, q_start + c) (key_offset at most
    ``first_key(q_start, window)``). ``sinks`` [Hq]: a sink logit per head joins each softmax's
    denominator. Returns [B, Hq, c, D]."""
    out, lse = _attend(q, k, v, q_start, key_starts, window, scale, key_offset, sinks is not None)
    return out if sinks is None else with_sinks(out, lse, sinks)
