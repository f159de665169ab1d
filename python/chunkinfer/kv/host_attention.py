"""Decode over host-resident KV, split between the CPU and PCIe.

Streaming a host layer's whole prefix to the GPU for every decode step is bounded by the pinned
host-to-device bandwidth. The CPU can read the same host memory at the same time: in a step (a few
new tokens on the decode kernels), the first ``n_cpu`` cached positions of each host layer are attended on the CPU where
they live (``ops.decode_attention``'s CPU kernel), only positions [n_cpu, end) cross PCIe into the
staging slot and are attended on the GPU, and the two partial results are merged by log-sum-exp
(``ops.merge_attn_states``). ``n_cpu`` is chosen so that both parts take the same time: from the
H2D rate and the CPU attention rate measured on earlier steps.

The CPU part needs the layer's query, so the host waits for it (one event per layer): this is the
one place the layer loop synchronises with the GPU, inherent to computing on the CPU. The GPU part
is queued before that wait, so it runs while the CPU works.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import ops
from ..planner.rates import H200_H2D_BYTES_PER_S as H2D_BYTES_PER_S  # pinned host->device copies, measured
from .device_layer import ALIGN
from .offload import EncodedKVLayer

CPU_BYTES_PER_S_PRIOR = 66e9  # bf16 K, V read by the CPU kernel on the H200 host's 16 cores while the
#                               H2D copies run (bench/results/host_decode_h200.md); refined by measurement

_EMA = 0.5                    # weight of the newest CPU rate measurement


@dataclass
class CpuShare:
    """Which share of a host layer's cached positions the CPU attends in a decode step.

    ``fixed``: a share in [0, 1] given by the user, or None to balance it from the rates: the CPU's
    measured on earlier steps (exponential average), the H2D copy rate a constant."""

    fixed: float | None = None
    cpu_bytes_per_s: float = CPU_BYTES_PER_S_PRIOR
    h2d_bytes_per_s: float = H2D_BYTES_PER_S

    def share(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return self.cpu_bytes_per_s / (self.cpu_bytes_per_s + self.h2d_bytes_per_s)

    def cpu_positions(self, cached: int) -> int:
        """Positions [0, n) of ``cached`` the CPU attends: a multiple of 256, 0 for short caches."""
        n = int(self.share() * cached) // ALIGN * ALIGN  # whole cache-alignment rows: tidy copies
        return max(0, min(n, cached))

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.cpu_bytes_per_s = (1 - _EMA) * self.cpu_bytes_per_s + _EMA * nbytes / seconds


def parse_cpu_attention(value) -> CpuShare | None:
    """convert()'s ``cpu_attention``: "auto" (balanced), a share in [0, 1], or False/0 for PCIe only."""
    if value is False or value is None:
        return None
    if value == "auto":
        return CpuShare()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cpu_attention must be 'auto', a share in [0, 1] or False, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"cpu_attention must be a share in [0, 1], got {value}")
    return CpuShare(fixed=float(value)) if value > 0 else None


@dataclass
class SplitStep:
    """One step's split: lengths and buffers shared by every host layer of the step."""

    n_cpu: int                   # positions [0, n_cpu) attended on the CPU
    gpu_lens: torch.Tensor       # [B] int32, device: the GPU part ends after the new tokens
    gpu_starts: torch.Tensor     # [B] int32, device: max(left padding, n_cpu)
    cpu_lens: torch.Tensor       # [B] int32, host: n_cpu
    cpu_starts: torch.Tensor     # [B] int32, host: left padding (clamped to n_cpu by the kernel)
    q_host: torch.Tensor         # [B, Hq, T, D] pinned
    out_host: torch.Tensor       # [B, Hq, T, D] pinned
    lse_host: torch.Tensor       # [B, Hq, T] fp32 pinned

    @classmethod
    def build(cls, n_cpu: int, end: int, key_starts: list[int] | None, batch: int, n_q: int, tokens: int,
              head_dim: int, dtype: torch.dtype, device: torch.device) -> "SplitStep":
        starts = key_starts or [0] * batch
        pin = device.type == "cuda"

        def host(shape, dt=dtype):
            return torch.empty(shape, dtype=dt, pin_memory=pin)

        return cls(
            n_cpu=n_cpu,
            gpu_lens=torch.full((batch,), end, dtype=torch.int32, device=device),
            gpu_starts=torch.tensor([max(s, n_cpu) for s in starts], dtype=torch.int32, device=device),
            cpu_lens=torch.full((batch,), n_cpu, dtype=torch.int32),
            cpu_starts=torch.tensor(starts, dtype=torch.int32),
            q_host=host((batch, n_q, tokens, head_dim)), out_host=host((batch, n_q, tokens, head_dim)),
            lse_host=host((batch, n_q, tokens), torch.float32),
        )


def split_decode_attention(q: torch.Tensor, staged, host_layer, step: SplitStep, scale: float,
                           share: CpuShare) -> torch.Tensor:
    """Attention of T new tokens per sequence (q [B, Hq, T, D], their K, V already in the staging slot
    ``staged`` at positions [end - T, end)) over the host layer's positions [0, n_cpu) on the CPU and the
    staged positions [n_cpu, end) on the GPU, causal among the new tokens; returns [B, Hq, T, D] on q's
    device. Every cached position precedes the new tokens, so on the CPU each query sees all of
    [start, n_cpu): the T queries go in as T times the heads, one token each."""
    b, hq, t, d = q.shape
    step.q_host.copy_(q, non_blocking=True)
    q_ready = torch.cuda.Event() if q.is_cuda else None
    if q_ready is not None:
        q_ready.record()
    out_g, lse_g = ops.decode_attention(q, staged.k_buf, staged.v_buf, step.gpu_lens, step.gpu_starts, scale=scale)
    if q_ready is not None:
        q_ready.synchronize()
    t0 = time.perf_counter()
    q_rows, out_rows, lse_rows = (step.q_host.view(b, hq * t, 1, d), step.out_host.view(b, hq * t, 1, d),
                                  step.lse_host.view(b, hq * t, 1))
    encoded = isinstance(host_layer, EncodedKVLayer)
    if not encoded:
        ops.decode_attention(q_rows, host_layer.k_buf, host_layer.v_buf, step.cpu_lens, step.cpu_starts,
                             scale=scale, out=out_rows, lse=lse_rows)
    else:  # encoded host KV: read where it is, block by block, with the plain kernel's arithmetic
        out_c, lse_c = ops.decode_attention_kv_codec(q_rows, host_layer.k_enc.encoded(step.n_cpu),
                                                     host_layer.v_enc.encoded(step.n_cpu), step.cpu_lens,
                                                     step.cpu_starts, scale=scale)
        out_rows.copy_(out_c)
        lse_rows.copy_(lse_c)
    _, hkv, _, _ = host_layer.held_shape()
    # raw-equivalent bytes: the rate compares positions per second with the H2D copy's
    share.observe(2 * b * hkv * step.n_cpu * d * q.element_size(), time.perf_counter() - t0)
    out_c = step.out_host.to(q.device, non_blocking=True)
    lse_c = step.lse_host.to(q.device, non_blocking=True)
    out, _ = ops.merge_attn_states(out_g, lse_g, out_c, lse_c)
    return out
