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


def _merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """The merge_attn_states op (float64, which the kernels do not take, by its reference)."""
    if out_a.dtype == torch.float64:
        return reference.merge_attn_states(out_a, lse_a, out_b, lse_b)[0]
    # the op takes rows of one stride: cuDNN may return other layouts (then one chunk's rows are copied)
    return ops.merge_attn_states(out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(), lse_b.contiguous())[0]


def _prefix_and_block(q, k, v, q_start: int, key_start: int, scale: float) -> torch.Tensor:
    """One batch group sharing key_start: keys [key_start, q_start) without mask, merged by LSE with the
    block's own causal part. Query rows before key_start (padding) get zeros."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    first = max(0, key_start - q_start)  # first query row that is not padding
    out = q.new_zeros(q.shape) if first > 0 else None
    qb = q[:, :, first:]
    kb = k[:, :, q_start + first: q_start + c]
    vb = v[:, :, q_start + first: q_start + c]
    if qb.shape[2] == 0:
        return out
    o_blk, lse_blk = attention_with_lse(qb, _repeat_kv(kb, hq // hkv), _repeat_kv(vb, hq // hkv),
                                        causal=True, scale=scale)
    if key_start < q_start:
        o_pre, lse_pre = attention_with_lse(fold_gqa(qb, hkv), k[:, :, key_start:q_start],
                                            v[:, :, key_start:q_start], causal=False, scale=scale)
        o_blk = _merge(unfold_gqa(o_pre, hq), unfold_gqa(lse_pre, hq), o_blk, lse_blk)
    if out is None:
        return o_blk
    out[:, :, first:] = o_blk
    return out


def _windowed(q, k, v, q_start: int, key_starts: list[int] | None, window: int, scale: float) -> torch.Tensor:
    """Sliding-window block: keys [lo, q_start + c) with a small [B, 1, c, keys] boolean band mask."""
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
    out = gqa_attention(fold_gqa(q, hkv), k[:, :, lo:hi], v[:, :, lo:hi], scale=scale, attn_mask=mask)
    return unfold_gqa(out, hq)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                    key_starts: list[int] | None, window: int | None, scale: float) -> torch.Tensor:
    """Attention of q [B, Hq, c, D] (cache positions [q_start, q_start + c)) over the cached k, v
    [B, Hkv, >= q_start + c, D]. Returns [B, Hq, c, D]."""
    c = q.shape[2]
    end = q_start + c
    if window is not None and c > 1 and end > window:
        return _windowed(q, k, v, q_start, key_starts, window, scale)
    win_start = 0 if window is None else max(0, end - window)
    if c == 1:  # decode: one fused GQA call over the key range, no mask
        if key_starts is None:
            return gqa_attention(q, k[:, :, win_start:end], v[:, :, win_start:end], scale=scale)
        # min(s, end - 1): a sequence still all padding sees itself rather than nothing (NaN)
        return torch.cat([gqa_attention(q[i:i + 1], k[i:i + 1, :, max(min(s, end - 1), win_start):end],
                                        v[i:i + 1, :, max(min(s, end - 1), win_start):end], scale=scale)
                          for i, s in enumerate(key_starts)])
    if key_starts is None:
        return _prefix_and_block(q, k, v, q_start, 0, scale)
    out = torch.empty_like(q)
    for i, s in enumerate(key_starts):  # left padding: each sequence its own key range
        out[i:i + 1] = _prefix_and_block(q[i:i + 1], k[i:i + 1], v[i:i + 1], q_start, s, scale)
    return out
