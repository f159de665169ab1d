"""An independent fp32 (or fp64) recomputation of one decode step over the K, V a cache holds.

For runs too long for any stock model to check against (a million tokens and more): the next token's
logits are recomputed in plain PyTorch at high precision from the model's weights and the cache's
stored K, V (device- or host-resident), read in blocks and merged by log-sum-exp. Kept deliberately
plain, not sharing the layer loop's code, so that it checks it. Batch 1, no padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.adapters import bind
from ..models.devices import unhooked


def _norm(x: torch.Tensor, module, eps: float, gemma: bool) -> torch.Tensor:
    w = module.weight.to(x.device, x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((1 + w) if gemma else w)


def _linear(x: torch.Tensor, m) -> torch.Tensor:
    return F.linear(x, m.weight.to(x.device, x.dtype), None if m.bias is None else m.bias.to(x.device, x.dtype))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    rotated = torch.cat([-xr[..., rd // 2:], xr[..., :rd // 2]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, rest], dim=-1)


def _attend(q, k_new, v_new, band, lo: int, past: int, scale: float, block: int, ct):
    """softmax over stored keys [lo, past) and the new one; q [Hkv, g, D], band(a, b) the cache layer's
    K, V [1, Hkv, b - a, D] of positions [a, b) (raw, wherever and however the layer holds them)."""
    dev = q.device
    s_new = (q * k_new[:, None]).sum(-1) * scale                    # [Hkv, g]
    lse, acc = s_new, v_new[:, None].expand_as(q).clone()           # running log-sum-exp, normalised output
    for a in range(lo, past, block):
        b = min(a + block, past)
        k_part, v_part = band(a, b)
        k = k_part[0].to(dev, ct, non_blocking=False)
        v = v_part[0].to(dev, ct, non_blocking=False)
        s = torch.einsum("hgd,hnd->hgn", q, k) * scale
        blk_lse = torch.logsumexp(s, -1)
        blk_out = torch.einsum("hgn,hnd->hgd", torch.softmax(s, -1), v)
        new = torch.logaddexp(lse, blk_lse)
        acc = acc * torch.exp(lse - new)[..., None] + blk_out * torch.exp(blk_lse - new)[..., None]
        lse = new
    return acc


@torch.no_grad()
def reference_step_logits(model, cache, token: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                          kv_block: int = 65536) -> torch.Tensor:
    """Logits [V] of ``token`` [1, 1] placed after the ``cache.get_seq_length()`` cached positions,
    recomputed in ``dtype``. Reads the cache, never writes it. On a model spread over devices each
    layer is recomputed on its own device (weights offloaded by accelerate are not supported)."""
    mb = bind(model)
    if token.shape != (1, 1):
        raise ValueError(f"token must be [1, 1], got {tuple(token.shape)}")
    past = cache.get_seq_length()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("reference_step_logits reads weights directly: accelerate-offloaded weights are not supported")
    ad = mb.adapter
    unmodelled = [what for what, has in (("mixture-of-experts MLPs", ad.moe is not None), ("attention sinks", ad.sinks),
                                         ("half-width rotary tables", ad.rope_half_tables),
                                         ("interleaved rotary", ad.rope_interleaved)) if has]
    if unmodelled:
        raise ValueError(f"reference_step_logits does not model {', '.join(unmodelled)} ({ad.label})")
    dev = mb.devices.embed
    gemma, eps = mb.adapter.gemma_norms, mb.norm_eps
    x = mb.embed(token.to(dev)).to(dtype)                               # [1, 1, H]
    pos = torch.tensor([[past]], device=dev)
    for lb, layer, layer_dev in zip(mb.layers, cache.layers, mb.devices.layers):
        x, pos = x.to(layer_dev), pos.to(layer_dev)
        h = _norm(x, lb.input_norm, eps, gemma)
        if len(lb.qkv) == 1:
            qkv = _linear(h, lb.qkv[0])
            nq, nk = lb.n_q * lb.head_dim, lb.n_kv * lb.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = (_linear(h, m) for m in lb.qkv)
        q = q.view(lb.n_q, lb.head_dim)
        k = k.view(lb.n_kv, lb.head_dim)
        v = v.view(lb.n_kv, lb.head_dim)
        if lb.q_norm is not None:
            q, k = _norm(q, lb.q_norm, eps, gemma), _norm(k, lb.k_norm, eps, gemma)
        args = (x, pos) if lb.rope_key is None else (x, pos, lb.rope_key)
        cos, sin = (t.to(dtype).view(1, -1) for t in unhooked(mb.rotary)(*args))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        lo = 0 if lb.window is None else max(0, past + 1 - lb.window)
        g = lb.n_q // lb.n_kv
        o = _attend(q.view(lb.n_kv, g, lb.head_dim), k, v, layer.band, lo, past, lb.scale, kv_block, dtype)
        o = _linear(o.reshape(1, 1, -1), lb.o_proj)
        if lb.attn_out_norm is not None:
            o = _norm(o, lb.attn_out_norm, eps, gemma)
        x = x + o
        h = _norm(x, lb.mlp_norm, eps, gemma)
        if len(lb.gate_up) == 1:
            gate, up = _linear(h, lb.gate_up[0]).chunk(2, dim=-1)
        else:
            gate, up = _linear(h, lb.gate_up[0]), _linear(h, lb.gate_up[1])
        act = F.silu(gate) if mb.act == "silu" else F.gelu(gate, approximate=mb.act_approximate)
        down = _linear(act * up, lb.down)
        if lb.mlp_out_norm is not None:
            down = _norm(down, lb.mlp_out_norm, eps, gemma)
        x = x + down
    logits = _linear(_norm(x, mb.final_norm, eps, gemma), mb.lm_head)[0, 0]
    if mb.final_softcap is not None:
        logits = torch.tanh(logits / mb.final_softcap) * mb.final_softcap
    return logits
