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



# ---- lossless KV codec (format: csrc/kv_codec_format.h; layout arithmetic: kv_codec.py) ----

def _le_bytes(v: torch.Tensor, n: int) -> torch.Tensor:
    """Little-endian bytes of int64 values: [..., n] uint8."""
    shifts = torch.arange(0, 8 * n, 8, device=v.device)
    return ((v.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def _pack_bits(bits: torch.Tensor, per_byte: int) -> torch.Tensor:
    """[G, Np] values of 8 // per_byte bits, packed per_byte to a byte, first in the low bits."""
    width = 8 // per_byte
    shifts = torch.arange(0, 8, width, device=bits.device)
    return (bits.view(bits.shape[0], -1, per_byte) << shifts).sum(-1).to(torch.uint8)


def kv_encode_out(blocks: torch.Tensor, spill: torch.Tensor, spill_used: torch.Tensor, x: torch.Tensor,
                  table: torch.Tensor, block_rows: int = 16, escape_capacity: int = 16) -> None:
    """The encoder of kv_codec_format.h: slots in blocks [..., nb, slot_bytes], spilled blocks'
    exponent planes into spill from slot spill_used on (spill_used advances by one per spilled block)."""
    from .kv_codec import ESCAPE, NOT_SPILLED, SPILL_LOST, KVCodecLayout, block_view, code_of_exponent, split_bits

    lay = KVCodecLayout(x.dtype, x.shape[-1], block_rows, escape_capacity)
    e, rest, extra = (block_view(t, lay)[0] for t in split_bits(x))
    valid = block_view(x, lay)[1]
    g, np_ = e.shape
    codes = torch.where(valid, code_of_exponent(table)[e], 0)
    escaped = (codes == ESCAPE) & valid
    n_esc = escaped.sum(1)
    slots = torch.zeros(g, lay.slot_bytes, dtype=torch.uint8, device=x.device)
    slots[:, lay.rest_offset:lay.codes_offset] = torch.where(valid, rest, 0).to(torch.uint8)
    slots[:, lay.codes_offset:lay.extra_offset] = _pack_bits(codes, 2)
    for j in range(lay.extra_planes):
        start = lay.extra_offset + j * lay.extra_plane_bytes
        slots[:, start:start + lay.extra_plane_bytes] = _pack_bits(torch.where(valid, (extra >> j) & 1, 0), 8)
    rank = escaped.cumsum(1) - 1
    keep = escaped & (rank < escape_capacity)
    if escape_capacity:
        entries = torch.zeros(g, escape_capacity, dtype=torch.int64, device=x.device)
        pos = torch.arange(np_, device=x.device).expand(g, np_)
        rows_, cols = keep.nonzero(as_tuple=True)
        entries[rows_, rank[rows_, cols]] = (pos[rows_, cols] << 8) | e[rows_, cols].long()
        slots[:, lay.escape_offset:] = _le_bytes(entries, 4).view(g, -1)
    spilled = n_esc > escape_capacity
    index = spill_used.long().cpu() + spilled.cpu().long().cumsum(0) - 1
    stored = spilled.cpu() & (index >= 0) & (index < spill.shape[0])
    field = torch.where(spilled.cpu(), torch.where(stored, index, SPILL_LOST), NOT_SPILLED)
    slots[:, 0:4] = _le_bytes(n_esc.long(), 4)
    slots[:, 4:8] = _le_bytes(field.to(x.device), 4)
    planes = torch.where(valid, e, 0).to(torch.uint8)
    stored_d = stored.to(x.device)
    spill[index[stored].to(x.device)] = planes[stored_d]
    spill_used += spilled.sum().to(spill_used.dtype)
    blocks.copy_(slots.view(blocks.shape))


def kv_encode(x: torch.Tensor, table: torch.Tensor, block_rows: int = 16, escape_capacity: int = 16,
              spill_blocks: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import math

    from .kv_codec import KVCodecLayout

    lay = KVCodecLayout(x.dtype, x.shape[-1], block_rows, escape_capacity)
    nb = lay.num_blocks(x.shape[-2])
    cap = math.prod(x.shape[:-2]) * nb if spill_blocks < 0 else spill_blocks
    blocks = torch.empty(*x.shape[:-2], nb, lay.slot_bytes, dtype=torch.uint8, device=x.device)
    spill = torch.zeros(cap, lay.spill_unit_bytes, dtype=torch.uint8, device=x.device)
    used = torch.zeros(1, dtype=torch.int32, device=x.device)
    kv_encode_out(blocks, spill, used, x, table, block_rows, escape_capacity)
    return blocks, spill, used


def kv_decode_out(out: torch.Tensor, blocks: torch.Tensor, spill: torch.Tensor, table: torch.Tensor,
                  block_rows: int = 16, escape_capacity: int = 16) -> None:
    """The decoder of kv_codec_format.h into out [..., S, D]; data a block does not hold (a lost spill, a
    code-15 element missing from the escape list) decodes to NaN."""
    from .kv_codec import ESCAPE, KVCodecLayout, join_bits, nan_bits, words_to

    lay = KVCodecLayout(out.dtype, out.shape[-1], block_rows, escape_capacity)
    slots = blocks.reshape(-1, lay.slot_bytes).long()
    g, np_ = slots.shape[0], lay.padded_elems

    def u32(col: int) -> torch.Tensor:
        return slots[:, col] | slots[:, col + 1] << 8 | slots[:, col + 2] << 16 | slots[:, col + 3] << 24

    n_esc, field = u32(0), u32(4)
    rest = slots[:, lay.rest_offset:lay.codes_offset]
    packed = slots[:, lay.codes_offset:lay.extra_offset]
    codes = torch.stack([packed & 0xF, packed >> 4], -1).view(g, np_)
    extra = torch.zeros_like(rest)
    for j in range(lay.extra_planes):
        start = lay.extra_offset + j * lay.extra_plane_bytes
        plane = slots[:, start:start + lay.extra_plane_bytes]
        extra |= ((plane.unsqueeze(-1) >> torch.arange(8, device=out.device)) & 1).view(g, np_) << j
    e = table.long()[codes]
    missing = codes == ESCAPE
    if escape_capacity:
        ent = slots[:, lay.escape_offset:].view(g, escape_capacity, 4)
        entries = ent[..., 0] | ent[..., 1] << 8 | ent[..., 2] << 16 | ent[..., 3] << 24
        listed = torch.arange(escape_capacity, device=out.device) < n_esc.unsqueeze(1)
        pos = entries >> 8
        hit = listed & (pos < np_)
        rows_, k = hit.nonzero(as_tuple=True)
        found = torch.zeros(g, np_, dtype=torch.bool, device=out.device)
        found[rows_, pos[rows_, k]] = True
        esc_exp = torch.zeros(g, np_, dtype=torch.int64, device=out.device)
        esc_exp[rows_, pos[rows_, k]] = entries[rows_, k] & 0xFF
        e = torch.where(missing & found, esc_exp, e)
        missing &= ~found
    spilled = n_esc > escape_capacity
    stored = spilled & (field < spill.shape[0])
    if spill.shape[0]:
        plane = spill.long()[torch.where(stored, field, 0)]
        e = torch.where(stored.unsqueeze(1), plane, e)
    missing = torch.where(spilled.unsqueeze(1), ~stored.unsqueeze(1), missing)
    w = torch.where(missing, nan_bits(out.dtype), join_bits(e, rest, extra, out.dtype))
    rows, d = out.shape[-2], out.shape[-1]
    flat = w[:, : lay.block_elems].reshape(-1, lay.num_blocks(rows) * lay.block_elems)[:, : rows * d]
    out.copy_(words_to(flat, out.dtype).view(out.shape))


def kv_decode(blocks: torch.Tensor, spill: torch.Tensor, table: torch.Tensor, rows: int, head_dim: int,
              dtype: torch.dtype, block_rows: int = 16, escape_capacity: int = 16) -> torch.Tensor:
    out = torch.empty(*blocks.shape[:-2], rows, head_dim, dtype=dtype, device=blocks.device)
    kv_decode_out(out, blocks, spill, table, block_rows, escape_capacity)
    return out


def decode_attention_kv_codec(q: torch.Tensor, k_blocks: torch.Tensor, k_spill: torch.Tensor, k_table: torch.Tensor,
                              v_blocks: torch.Tensor, v_spill: torch.Tensor, v_table: torch.Tensor,
                              seq_lens: torch.Tensor, starts: torch.Tensor | None = None, scale: float | None = None,
                              block_rows: int = 16, k_escape_capacity: int = 16, v_escape_capacity: int = 16,
                              split_keys: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_attention` over K and V held as codec blocks [B, Hkv, nb, slot_bytes]: the blocks
    decoded (capacity nb * block_rows positions), then the plain attention."""
    rows, d = k_blocks.shape[2] * block_rows, q.shape[-1]
    k = kv_decode(k_blocks, k_spill, k_table, rows, d, q.dtype, block_rows, k_escape_capacity)
    v = kv_decode(v_blocks, v_spill, v_table, rows, d, q.dtype, block_rows, v_escape_capacity)
    return decode_attention(q, k, v, seq_lens, starts, scale, 0, split_keys)
