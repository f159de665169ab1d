"""The generic decoder-layer loop: layer-major, chunk by chunk, K, V written in place into the cache.

Only the residual stream [B, S, H] and the cache are whole-sequence tensors; every other tensor is the
size of one chunk, and the MLP activation goes into one buffer reused by every chunk and layer.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .adapters import LayerBinding, ModelBinding
from .attention import block_attention
from .cache import ChunkKVCache, KVBuffers
from .host_attention import SplitStep, split_decode_attention
from .kv_offload import LayerStreamer
from .model_devices import unhooked

_PREFILL_HEADROOM = 1024  # spare cache positions after a prefill, so the first decode steps do not grow it


@dataclass
class LoopInputs:
    hidden: torch.Tensor            # [B, S, H] residual stream; updated in place
    position_ids: torch.Tensor      # [B or 1, S] rotary positions
    start: int                      # cache positions already filled before this call
    key_starts: list[int] | None    # per-sequence first visible cache position (left padding)
    chunk: int                      # rows per chunk; with ``chunks``, the smallest of them
    last_rows_from: int = 0         # the last layer computes outputs only for rows >= this
    hidden_states: list | None = None  # collects the input of every layer when not None
    write_index: torch.Tensor | None = None  # [S] int64 cache positions of the rows (start + arange(S))
    progress: Callable[[int, int], None] | None = None  # (chunks done, chunks in all) after each chunk
    chunks: list[int] | None = None  # per layer (the planner's non-increasing schedule); None: ``chunk``


class _Rope:
    """cos and sign-folded sin per chunk from the model's own rotary module.

    rotate_half(x) * sin == roll(x, D/2) * cat(-sin1, sin2) exactly, which saves three ops per call.
    """

    def __init__(self, mb: ModelBinding, inp: LoopInputs):
        # positions where the stream is (generate() may build them on the inputs' device, not the layer's)
        self.mb, self.pos, self.x = mb, inp.position_ids.to(inp.hidden.device), inp.hidden
        # dynamic / longrope pick frequencies from the call's max position: give every chunk that max
        self.global_max = self.pos.amax(1, keepdim=True) if mb.rope_needs_global_max else None
        self.single_chunk = inp.position_ids.shape[1] <= inp.chunk
        self.memo: dict = {}

    def get(self, key: str | None, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        memo_key = (key, c0, c1)
        if self.single_chunk and memo_key in self.memo:
            return self.memo[memo_key]
        pos = self.pos[:, c0:c1]
        if self.global_max is not None:
            pos = torch.cat([pos, self.global_max], dim=1)
        rotary = unhooked(self.mb.rotary)  # computed where the layer runs (accelerate's hook would move it)
        cos, sin = rotary(self.x, pos) if key is None else rotary(self.x, pos, key)
        if self.global_max is not None:
            cos, sin = cos[:, :-1], sin[:, :-1]
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        res = (cos, sin)  # [B, c, rot_dim]
        if self.single_chunk:
            self.memo[memo_key] = res
        return res


def _one_row_gemv(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a projection of x goes to the gemv ops: one row (a batch-1 decode step). Measured on
    the H200 (bench/results/gemv_h200.md, profile_decode_h200.md): q|k|v and act(gate)*up beat cuBLAS
    alone, o_proj and down tie with it alone and shorten the step (no split-K reduce kernels); from 2
    rows on F.linear is faster."""
    return x.numel() == x.shape[-1] and ops.gemv_supports(x, *weights)


def _linear(x: torch.Tensor, m) -> torch.Tensor:
    if _one_row_gemv(x, m.weight):
        return ops.gemv(x, [m.weight], [m.bias])
    return F.linear(x, m.weight, m.bias)


def _gemv(x: torch.Tensor, modules, norm: ops.NormPrologue | None = None) -> torch.Tensor | None:
    """The projections of a decode step's row by every module, side by side, in one launch (of
    rms_norm(x (+ add)) with ``norm``); None where the gemv ops do not serve it (more rows, layouts),
    for F.linear to do."""
    weights = [m.weight for m in modules]
    if not _one_row_gemv(x, *weights):
        return None
    return ops.gemv(x, weights, [m.bias for m in modules], norm=norm)


class _Layer:
    """One layer's computations on a block of rows (bound per call to keep the inner loop flat)."""

    def __init__(self, mb: ModelBinding, lb: LayerBinding, cache_layer: KVBuffers, inp: LoopInputs,
                 rope: _Rope, act_buf: torch.Tensor):
        self.mb, self.lb, self.cache, self.inp, self.rope, self.act_buf = mb, lb, cache_layer, inp, rope, act_buf
        self.gemma = mb.adapter.gemma_norms
        self.eps = mb.norm_eps

    def _norm(self, x: torch.Tensor, module) -> torch.Tensor:
        return ops.rms_norm(x, module.weight, self.eps, gemma=self.gemma)

    def _qkv(self, h: torch.Tensor, want_q: bool, norm: ops.NormPrologue | None = None):
        """q, k, v of rows h; with ``norm``, of rms_norm(h (+ add)) in the gemv's launch (which must serve h)."""
        lb = self.lb
        b, c, _ = h.shape
        mods = lb.qkv if want_q or len(lb.qkv) == 1 else lb.qkv[1:]
        qkv = _gemv(h, mods, norm)  # a decode step: every projection in one launch
        if qkv is None and len(mods) == 1:
            qkv = _linear(h, mods[0])
        if qkv is not None:
            nq = lb.n_q * lb.head_dim if mods[0] is lb.qkv[0] else 0
            nk = lb.n_kv * lb.head_dim
            q, k, v = qkv[..., :nq] if want_q else None, qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q = _linear(h, lb.qkv[0]) if want_q else None
            k, v = _linear(h, lb.qkv[1]), _linear(h, lb.qkv[2])
        k = k.view(b, c, lb.n_kv, lb.head_dim)
        v = v.view(b, c, lb.n_kv, lb.head_dim)
        if lb.k_norm is not None:
            k = self._norm(k, lb.k_norm)
        if want_q:
            q = q.view(b, c, lb.n_q, lb.head_dim)
            if lb.q_norm is not None:
                q = self._norm(q, lb.q_norm)
        return q, k, v  # [B, c, heads, D]

    def _rotate_and_write(self, q, k, v, r0: int, r1: int, index: torch.Tensor) -> None:
        """Rotary on q (in place) and k; k, v into the cache at ``index``: one fused op."""
        cos, sin = self.rope.get(self.lb.rope_key, r0, r1)
        ops.rotary_kv_write(q, k, v, cos, sin, self.cache.k_buf, self.cache.v_buf, index)

    def kv_only(self, r0: int, r1: int) -> None:
        """Write this layer's K, V for rows [r0, r1) without computing anything else."""
        h = self._norm(self.inp.hidden[:, r0:r1], self.lb.input_norm)
        _, k, v = self._qkv(h, want_q=False)
        self._rotate_and_write(None, k, v, r0, r1, self.inp.write_index[r0:r1])

    def block(self, r0: int, r1: int) -> None:
        """The whole layer on rows [r0, r1): attention (K, V into the cache), MLP, residual in place."""
        lb, inp = self.lb, self.inp
        x = inp.hidden[:, r0:r1]
        q, k, v = self._qkv(self._norm(x, lb.input_norm), want_q=True)
        self._rotate_and_write(q, k, v, r0, r1, inp.write_index[r0:r1])
        q_start = inp.start + r0
        keys, values = self.cache.view(q_start + x.shape[1])
        x.add_(self._finish(x, block_attention(q.transpose(1, 2), keys, values, q_start, inp.key_starts,
                                               lb.window, lb.scale)))

    def split_decode(self, host_layer, split: SplitStep, share, r0: int, r1: int) -> None:
        """One new token per sequence on a host-resident layer: its first cached positions attended
        on the CPU where they live, the staged rest on the GPU, merged (host_attention.py)."""
        lb, x = self.lb, self.inp.hidden
        q, k, v = self._qkv(self._norm(x, lb.input_norm), want_q=True)
        self._rotate_and_write(q, k, v, r0, r1, self.inp.write_index[r0:r1])
        x.add_(self._finish(x, split_decode_attention(q.transpose(1, 2), self.cache, host_layer, split, lb.scale,
                                                      share)))

    def decode_block(self, step: "DeviceStep", pending: torch.Tensor | None, spare: torch.Tensor) -> torch.Tensor:
        """One new token per sequence with its position, write index and lengths in device tensors,
        so the same launches serve every step: what a CUDA graph captures and replays. ``pending`` is
        the previous layer's MLP output, not yet in the residual; returns this layer's, for the next
        layer (or the caller) to add. Where the gemv ops serve the layer, each norm (with the residual
        add before it) runs inside the projection after it: the residual goes to ``spare`` and back
        (the projection's blocks all read the residual, so it is not updated in place)."""
        lb = self.lb
        x = self.inp.hidden  # [B, 1, H]
        gate_up = self._gemv_gate_up(x)
        if gate_up is not None:
            q, k, v = self._qkv(x, want_q=True, norm=ops.NormPrologue(lb.input_norm.weight, self.eps, self.gemma,
                                                                     add=pending, residual_out=spare))
            self._rotate_and_write(q, k, v, 0, 1, step.write_index)
            o = self._o_proj(x.shape, self._decode_attention(q, step))
            post = lb.pre_ff_norm if self.gemma else lb.post_attn_norm
            act = ops.gemv_act_and_mul(spare, *gate_up, self.mb.act, approximate=self.mb.act_approximate,
                                       norm=ops.NormPrologue(post.weight, self.eps, self.gemma, add=o, residual_out=x))
            return self._down(act)
        if pending is None:
            h = self._norm(x, lb.input_norm)
        else:
            ops.fused_add_rms_norm(pending, x, lb.input_norm.weight, self.eps, gemma=self.gemma)
            h = pending
        q, k, v = self._qkv(h, want_q=True)
        self._rotate_and_write(q, k, v, 0, 1, step.write_index)
        return self._finish(x, self._decode_attention(q, step))

    def _gemv_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The MLP's gate and up weights when a decode step's q|k|v and act(gate)*up both go to the
        gemv ops, norms included; None when they do not."""
        gate_w, up_w, biased = self._gate_up_weights()
        if biased or not _one_row_gemv(x, *(m.weight for m in self.lb.qkv), gate_w, up_w):
            return None
        return gate_w, up_w

    def _decode_attention(self, q: torch.Tensor, step: "DeviceStep") -> torch.Tensor:
        lb = self.lb
        # the step writes only the new token's K, V (rotary_kv_write, just before) and sets the lengths
        # before its first kernel: the attention may start loading older keys early
        attn, _ = ops.decode_attention(q.transpose(1, 2), self.cache.k_buf, self.cache.v_buf, step.seq_lens,
                                       step.starts, scale=lb.scale, window=lb.window or 0, prefix_ready=True)
        return attn

    def _o_proj(self, shape: torch.Size, attn: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [B, heads, c, D]; Gemma's post-attention norm on it."""
        lb = self.lb
        b, c, _ = shape
        o = _linear(attn.transpose(1, 2).reshape(b, c, lb.n_q * lb.head_dim), lb.o_proj)
        return self._norm(o, lb.post_attn_norm) if self.gemma else o

    def _down(self, act: torch.Tensor) -> torch.Tensor:
        lb = self.lb
        down = _linear(act, lb.down)
        return down if lb.post_ff_norm is None else self._norm(down, lb.post_ff_norm)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """o_proj, the post-attention norms and the MLP for rows x [B, c, H], the attention's residual
        added in place; returns the MLP output (not yet added)."""
        lb = self.lb
        o = self._o_proj(x.shape, attn)
        post = lb.pre_ff_norm if self.gemma else lb.post_attn_norm  # Gemma: sandwich, the pre-feed-forward norm
        ops.fused_add_rms_norm(o, x, post.weight, self.eps, gemma=self.gemma)
        return self._down(self._act(o))

    def _gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The MLP's gate and up weights (halves of a fused gate_up) and whether either has a bias."""
        lb = self.lb
        if len(lb.gate_up) == 1:
            w = lb.gate_up[0].weight
            inter = lb.down.weight.shape[1]
            return w[:inter], w[inter:], lb.gate_up[0].bias is not None
        return (lb.gate_up[0].weight, lb.gate_up[1].weight,
                lb.gate_up[0].bias is not None or lb.gate_up[1].bias is not None)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of the MLP: into the reused buffer, or for a decode step in one launch."""
        lb, mb = self.lb, self.mb
        b, c, _ = h.shape
        inter = lb.down.weight.shape[1]
        gate_w, up_w, biased = self._gate_up_weights()
        if not biased and _one_row_gemv(h, gate_w, up_w):
            return ops.gemv_act_and_mul(h, gate_w, up_w, mb.act, approximate=mb.act_approximate)
        act = self.act_buf[: b * c * inter].view(b, c, inter)
        if len(lb.gate_up) == 1:
            gate, up = _linear(h, lb.gate_up[0]), None
        else:
            gate, up = _linear(h, lb.gate_up[0]), _linear(h, lb.gate_up[1])
        if mb.act == "silu":
            ops.silu_and_mul(gate, up, out=act)
        else:
            ops.gelu_and_mul(gate, up, approximate=mb.act_approximate, out=act)
        return act


def _act_buffer(mb: ModelBinding, hidden: torch.Tensor, rows: int) -> torch.Tensor:
    """The MLP activation buffer every chunk and layer reuses: rows x the widest intermediate size."""
    return hidden.new_empty(rows * max(lb.down.weight.shape[1] for lb in mb.layers))


@dataclass
class DeviceStep:
    """A decode step's varying numbers as device tensors (their values change, their storage does not)."""

    write_index: torch.Tensor  # [1] int64: the cache position the new token's K, V go to
    seq_lens: torch.Tensor     # [B] int32: cached length after the write
    starts: torch.Tensor | None  # [B] int32: first visible position (left padding), or None


def run_decode_layers(mb: ModelBinding, cache: ChunkKVCache, inp: LoopInputs, step: DeviceStep) -> None:
    """Every layer on one new token per sequence (inp.hidden [B, 1, H]) with device-side positions;
    the cache layers must already have capacity for the write."""
    rope = _Rope(mb, inp)
    act_buf = _act_buffer(mb, inp.hidden, inp.hidden.shape[0])
    spare = torch.empty_like(inp.hidden)  # the residual's second buffer (decode_block)
    pending = None
    for li, lb in enumerate(mb.layers):
        pending = _Layer(mb, lb, cache.layers[li], inp, rope, act_buf).decode_block(step, pending, spare)
    inp.hidden.add_(pending)


def _layer_chunks(inp: LoopInputs, n_layers: int) -> list[int]:
    if inp.chunks is None:
        return [inp.chunk] * n_layers
    if len(inp.chunks) != n_layers or min(inp.chunks) != inp.chunk or any(
            not isinstance(c, int) or c < 1 for c in inp.chunks):
        raise ValueError(f"chunks must give each of the {n_layers} layers a chunk >= 1, the smallest equal to "
                         f"chunk ({inp.chunk}); got {inp.chunks}")
    return list(inp.chunks)


def _cross_to(inp: LoopInputs, device: torch.device) -> None:
    """The residual stream (and the positions) go to the next layer's device: the whole stream once
    per device boundary, never per chunk."""
    inp.hidden = inp.hidden.to(device)
    inp.position_ids = inp.position_ids.to(device)
    if inp.write_index is not None:
        inp.write_index = inp.write_index.to(device)


def run_layers(mb: ModelBinding, cache: ChunkKVCache, inp: LoopInputs) -> torch.Tensor:
    """Run every decoder layer over inp.hidden in place; afterwards each cache layer holds start + S
    positions. Rows of the last layer before ``last_rows_from`` are left stale (only their K, V count).
    Layer li runs in chunks of ``inp.chunks[li]`` rows when a schedule is given (chunking is exact).
    If anything raises, the cache keeps its previous length (positions written past it are ignored).
    Each layer runs on its own device (its KV and work buffers there too); returns the residual
    stream, which ends on the last layer's device (inp.hidden follows it)."""
    devices = mb.devices.layers
    if devices[0] != inp.hidden.device:
        _cross_to(inp, devices[0])
    here = devices[0]
    hidden = inp.hidden
    b, s, _ = hidden.shape
    chunks = _layer_chunks(inp, len(mb.layers))
    rope = _Rope(mb, inp)
    inp.write_index = torch.arange(inp.start, inp.start + s, device=hidden.device)
    end = inp.start + s
    headroom = _PREFILL_HEADROOM if s > 1 else 0
    last = len(mb.layers) - 1

    def shape_of(li: int):
        return b, mb.layers[li].n_kv, mb.layers[li].head_dim, hidden.dtype

    def n_chunks(rows: int, chunk: int) -> int:
        return -(-rows // chunk)

    streamer = LayerStreamer.for_call(cache, shape_of, inp.start, end, headroom,
                                      attends_all=lambda li: not mb.layers[li].window and ops.decode_kernel_supports(
                                          mb.layers[li].head_dim, hidden.device))
    splits: dict = {}  # (n_q, head_dim) -> the SplitStep of this call's CPU-attended host layers

    def split_for(lb: LayerBinding, n_cpu: int) -> SplitStep:
        key = (lb.n_q, lb.head_dim)
        if key not in splits:
            splits[key] = SplitStep.build(n_cpu, end, inp.key_starts, b, lb.n_q, lb.head_dim, hidden.dtype,
                                          hidden.device)
        return splits[key]

    lf = inp.last_rows_from
    total = sum(n_chunks(s, c) for c in chunks[:-1]) + n_chunks(lf, chunks[-1]) + n_chunks(s - lf, chunks[-1])
    done = 0
    act_buf, act_rows, layer = None, 0, None
    failed = True
    try:
        for li, lb in enumerate(mb.layers):
            chunk = chunks[li]
            if act_buf is not None and act_rows != b * min(chunk, s):
                act_buf = layer = None  # the schedule stepped down: free the larger buffer before this layer's KV
            if inp.hidden_states is not None:
                inp.hidden_states.append(hidden.clone())
            if devices[li] != here:
                here = devices[li]
                _cross_to(inp, here)
                hidden = inp.hidden
                rope = _Rope(mb, inp)
                act_buf = layer = None  # the work buffer lives on the layer's device
            streamed = streamer is not None and streamer.is_streamed(li)
            if streamed:
                kv = streamer.begin(li)
            else:
                kv = cache.layers[li]
                kv.reserve(b, lb.n_kv, lb.head_dim, hidden.dtype, hidden.device, end, headroom)
            if act_buf is None:
                act_rows = b * min(chunk, s)
                act_buf = _act_buffer(mb, hidden, act_rows)
            layer = _Layer(mb, lb, kv, inp, rope, act_buf)
            first = lf if li == last else 0
            steps = [(layer.kv_only, r0, min(r0 + chunk, first)) for r0 in range(0, first, chunk)]
            steps += [(layer.block, r0, min(r0 + chunk, s)) for r0 in range(first, s, chunk)]
            n_cpu = streamer.cpu_keys.get(li, 0) if streamed else 0
            if n_cpu:  # a one-token decode step (s == 1): attention split between the CPU and the GPU
                split = functools.partial(layer.split_decode, cache.layers[li], split_for(lb, n_cpu),
                                          cache.host.cpu_share)
                steps = [(split, 0, s)]
            with mb.devices.onloaded(li):  # accelerate-offloaded weights: loaded once for all chunks
                for fn, r0, r1 in steps:
                    fn(r0, r1)
                    if inp.progress is not None:
                        done += 1
                        inp.progress(done, total)
            if streamed:
                streamer.finish(li)
        failed = False
    finally:
        if streamer is not None:
            streamer.close(failed)
    for layer in cache.layers:
        layer.length = end
    return inp.hidden
