"""Typed wrappers over torch.ops.chunkinfer, and the fake (Meta) kernels torch.compile traces with.

The schemas are defined in C++ (csrc/registration.cpp). If the compiled extension cannot be loaded,
the same schemas are registered here with the reference implementations, so model code and
torch.compile behave the same everywhere; ``build_info()`` says which happened.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import reference

# Must equal the m.def(...) lines in csrc/registration.cpp (a test compares them).
SCHEMAS = {
    "silu_and_mul": "silu_and_mul(Tensor x, Tensor? up=None) -> Tensor",
    "silu_and_mul_out": "silu_and_mul_out(Tensor(a!) out, Tensor x, Tensor? up=None) -> ()",
    "gelu_and_mul": "gelu_and_mul(Tensor x, Tensor? up=None, str approximate='none') -> Tensor",
    "gelu_and_mul_out": "gelu_and_mul_out(Tensor(a!) out, Tensor x, Tensor? up=None, str approximate='none') -> ()",
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps, bool gemma=False) -> Tensor",
    "rms_norm_out": "rms_norm_out(Tensor(a!) out, Tensor x, Tensor weight, float eps, bool gemma=False) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, bool gemma=False) -> ()",
    "decode_attention": "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0, bool prefix_ready=False) -> (Tensor, Tensor)",
    "decode_attention_out": "decode_attention_out(Tensor(a!) out, Tensor(b!) lse, Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0, bool prefix_ready=False) -> ()",
    "merge_attn_states": "merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)",
    "merge_attn_states_out": "merge_attn_states_out(Tensor(a!) out, Tensor(b!) lse, Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> ()",
    "gemv": "gemv(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? norm_weight=None, float eps=0.0, bool gemma=False, Tensor? add=None, Tensor(a!)? residual_out=None) -> Tensor",
    "gemv_act_and_mul": "gemv_act_and_mul(Tensor x, Tensor gate, Tensor up, str activation, str approximate='none', Tensor? norm_weight=None, float eps=0.0, bool gemma=False, Tensor? add=None, Tensor(a!)? residual_out=None) -> Tensor",
    "rotary_kv_write": "rotary_kv_write(Tensor(a!)? q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor index) -> ()",
}

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # a broken or missing build: fall back, loudly
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"chunkinfer: compiled ops unavailable, using the PyTorch reference ({_LOAD_ERROR})")


def _gate_up_shape(x: torch.Tensor, up: torch.Tensor | None) -> list[int]:
    return list(x.shape) if up is not None else [*x.shape[:-1], x.shape[-1] // 2]


def _register_reference_ops() -> None:
    lib = torch.library.Library("chunkinfer", "DEF")  # noqa: F841 (kept alive by the registry)
    _register_reference_ops.lib = lib
    for schema in SCHEMAS.values():
        lib.define(schema)

    def silu_out(out, x, up=None):
        out.copy_(reference.silu_and_mul(x, up))

    def gelu_out(out, x, up=None, approximate="none"):
        out.copy_(reference.gelu_and_mul(x, up, approximate))

    def rms_out(out, x, weight, eps, gemma=False):
        out.copy_(reference.rms_norm(x, weight, eps, gemma))

    def fused(x, residual, weight, eps, gemma=False):
        normed, new_residual = reference.fused_add_rms_norm(x, residual, weight, eps, gemma)
        residual.copy_(new_residual)
        x.copy_(normed)

    def decode(q, k_cache, v_cache, seq_lens, starts=None, scale=None, window=0, prefix_ready=False):
        return reference.decode_attention(q, k_cache, v_cache, seq_lens, starts, scale, window)

    def decode_out(out, lse, q, k_cache, v_cache, seq_lens, starts=None, scale=None, window=0, prefix_ready=False):
        o, l = decode(q, k_cache, v_cache, seq_lens, starts, scale, window)
        out.copy_(o)
        lse.copy_(l)

    def merge_out(out, lse, out_a, lse_a, out_b, lse_b):
        o, l = reference.merge_attn_states(out_a, lse_a, out_b, lse_b)
        out.copy_(o)
        lse.copy_(l)

    def rotary_write(q, k, v, cos, sin, k_cache, v_cache, index):
        if q is not None:
            q.copy_(reference.rotate(q, cos, sin))
        keep = (index >= 0) & (index < k_cache.shape[2])
        k_cache.index_copy_(2, index[keep], reference.rotate(k, cos, sin)[:, keep].transpose(1, 2))
        v_cache.index_copy_(2, index[keep], v[:, keep].transpose(1, 2))

    impls = {
        "silu_and_mul": reference.silu_and_mul, "silu_and_mul_out": silu_out,
        "gelu_and_mul": reference.gelu_and_mul, "gelu_and_mul_out": gelu_out,
        "rms_norm": reference.rms_norm, "rms_norm_out": rms_out, "fused_add_rms_norm": fused,
        "decode_attention": decode, "decode_attention_out": decode_out,
        "merge_attn_states": reference.merge_attn_states, "merge_attn_states_out": merge_out,
        "rotary_kv_write": rotary_write, "gemv": reference.gemv, "gemv_act_and_mul": reference.gemv_act_and_mul,
    }
    for name, fn in impls.items():
        lib.impl(name, fn, "CompositeExplicitAutograd")


def _register_fakes() -> None:
    @torch.library.register_fake("chunkinfer::silu_and_mul")
    def _(x, up=None):
        return x.new_empty(_gate_up_shape(x, up))

    @torch.library.register_fake("chunkinfer::gelu_and_mul")
    def _(x, up=None, approximate="none"):
        return x.new_empty(_gate_up_shape(x, up))

    @torch.library.register_fake("chunkinfer::rms_norm")
    def _(x, weight, eps, gemma=False):
        return torch.empty_like(x)

    @torch.library.register_fake("chunkinfer::decode_attention")
    def _(q, k_cache, v_cache, seq_lens, starts=None, scale=None, window=0, prefix_ready=False):
        return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("chunkinfer::merge_attn_states")
    def _(out_a, lse_a, out_b, lse_b):
        return out_a.new_empty(out_a.shape), out_a.new_empty(out_a.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("chunkinfer::gemv")
    def _(x, weights, biases, norm_weight=None, eps=0.0, gemma=False, add=None, residual_out=None):
        return x.new_empty([*x.shape[:-1], sum(w.shape[0] for w in weights)])

    @torch.library.register_fake("chunkinfer::gemv_act_and_mul")
    def _(x, gate, up, activation, approximate="none", norm_weight=None, eps=0.0, gemma=False, add=None,
          residual_out=None):
        return x.new_empty([*x.shape[:-1], gate.shape[0]])

    for name in ("silu_and_mul_out", "gelu_and_mul_out", "rms_norm_out", "fused_add_rms_norm",
                 "decode_attention_out", "merge_attn_states_out", "rotary_kv_write"):
        torch.library.register_fake(f"chunkinfer::{name}")(lambda *args, **kwargs: None)


if _C is None:
    _register_reference_ops()
else:
    _register_fakes()


# ---- the Python API ----

def silu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up. x is [..., 2d] (gate | up), or the gate [..., d] when ``up`` is given."""
    if out is None:
        return torch.ops.chunkinfer.silu_and_mul(x, up)
    torch.ops.chunkinfer.silu_and_mul_out(out, x, up)
    return out


def gelu_and_mul(x: torch.Tensor, up: torch.Tensor | None = None, *, approximate: str = "none",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(gate, approximate) * up, laid out as for :func:`silu_and_mul`."""
    if out is None:
        return torch.ops.chunkinfer.gelu_and_mul(x, up, approximate)
    torch.ops.chunkinfer.gelu_and_mul_out(out, x, up, approximate)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension with fp32 statistics; ``gemma`` scales by (1 + weight)."""
    if out is None:
        return torch.ops.chunkinfer.rms_norm(x, weight, eps, gemma)
    torch.ops.chunkinfer.rms_norm_out(out, x, weight, eps, gemma)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       gemma: bool = False) -> None:
    """In place: residual += x, then x = rms_norm(residual) * weight."""
    torch.ops.chunkinfer.fused_add_rms_norm(x, residual, weight, eps, gemma)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     starts: torch.Tensor | None = None, *, scale: float | None = None, window: int = 0,
                     prefix_ready: bool = False, out: torch.Tensor | None = None,
                     lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new tokens per sequence over a preallocated KV cache; returns (out, lse).

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, capacity, D] (last dim contiguous, any other strides);
    seq_lens, starts [B] int32 on q's device. The new tokens' K, V are already in the cache: query t
    sits at position seq_lens[b] - T + t and sees keys [starts[b], pos] (only the last ``window``
    of them when window > 0), causal among the new tokens; Hq must be a multiple of Hkv. Lengths
    are read on the device, so a CUDA graph captured once serves every later length up to the
    capacity. out [B, Hq, T, D] has q's dtype, lse [B, Hq, T] is fp32 (natural log, -inf where a
    query saw no key, its out then 0). Pass both ``out`` and ``lse`` to write into them. The lengths
    are not checked against the capacity (that would need a device sync): a seq_len beyond it is
    read as the capacity, a start outside [0, seq_len] is clamped into it. CUDA: head dim 64, 128
    or 256, K, V 16-byte aligned; CPU: any head dim.

    ``prefix_ready`` (CUDA; a promise, not checked): no kernel still running when this one starts
    writes seq_lens, starts or the cached K, V before the new tokens, so the kernel reads them
    before the kernel ahead of it on the stream has finished (it is launched early). A kernel of
    PyTorch's own ends before the next one starts; chunkinfer's may not, so leave it False after
    writing older positions (``rotary_kv_write`` at earlier indices) just before this call.
    """
    if out is None and lse is None:
        return torch.ops.chunkinfer.decode_attention(q, k_cache, v_cache, seq_lens, starts, scale, window,
                                                     prefix_ready)
    if out is None or lse is None:
        raise ValueError("decode_attention: pass both out and lse, or neither")
    torch.ops.chunkinfer.decode_attention_out(out, lse, q, k_cache, v_cache, seq_lens, starts, scale, window,
                                              prefix_ready)
    return out, lse


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                      out: torch.Tensor | None = None,
                      lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint keys; returns (out, lse).

    out_a, out_b [..., D] of one dtype (e.g. [B, H, T, D]); lse_a, lse_b [...] fp32 natural-log
    log-sum-exps. A segment with lse -inf contributes nothing; both -inf give out 0, lse -inf.
    ``out``/``lse`` may be out_a/lse_a (or out_b/lse_b) to merge in place.
    """
    if out is None and lse is None:
        return torch.ops.chunkinfer.merge_attn_states(out_a, lse_a, out_b, lse_b)
    if out is None or lse is None:
        raise ValueError("merge_attn_states: pass both out and lse, or neither")
    torch.ops.chunkinfer.merge_attn_states_out(out, lse, out_a, lse_a, out_b, lse_b)
    return out, lse


def rotary_kv_write(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor) -> None:
    """Rotary embedding of new tokens and their K, V written into a preallocated cache, in one pass.

    q [B, T, Hq, D] (rotated in place; None to skip), k, v [B, T, Hkv, D], cos, sin [1 or B, T, R]
    with R even and <= D (partial rotary leaves dims R.. as they are) and ``sin``'s first half negated,
    so that x' = x * cos + roll(x, R/2) * sin == x * cos + rotate_half(x) * sin_hf. k_cache, v_cache
    [B, Hkv, capacity, D]: token t's rotated K and its V go to position index[t] (int64 [T] on the
    device, so a CUDA graph replays it at every step; positions outside the capacity are skipped).
    All last dims contiguous, one dtype; fp32 math with one rounding per output.
    """
    torch.ops.chunkinfer.rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, index)


GEMV_MAX_ROWS = 4  # rows of x the gemv ops take (csrc/ops.h kGemvMaxRows); more are a matrix product
GEMV_MAX_X_BYTES = 144 * 1024  # x's rows in shared memory on CUDA (csrc/ops.h kGemvMaxXBytes)


@dataclass(frozen=True)
class NormPrologue:
    """What the gemv ops compute in front of their projections, in the same launch on CUDA: the
    residual r = x (+ add), rounded to x's dtype, written to ``residual_out`` if given (which must not
    share memory with x or add), and the projections are of rms_norm(r) with ``weight`` (Gemma's
    (1 + weight) when ``gemma``), as :func:`fused_add_rms_norm` rounds it. A decode step passes the
    previous sublayer's output as ``add`` and alternates between two residual buffers."""

    weight: torch.Tensor
    eps: float
    gemma: bool = False
    add: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None

    def args(self) -> tuple:
        return self.weight, self.eps, self.gemma, self.add, self.residual_out


_NO_PROLOGUE = (None, 0.0, False, None, None)


def gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, *,
         norm: NormPrologue | None = None) -> torch.Tensor:
    """x [..., K] (1 to GEMV_MAX_ROWS rows, contiguous) projected by each weight [M_i, K] (+ its bias),
    the outputs side by side: [..., sum M_i] (q, k and v of a decode step in one launch on CUDA), of
    rms_norm(x (+ add)) with ``norm``. Each projection is rounded to x's dtype as F.linear rounds it.
    See :func:`gemv_supports`."""
    pro = _NO_PROLOGUE if norm is None else norm.args()
    return torch.ops.chunkinfer.gemv(x, weights, [None] * len(weights) if biases is None else biases, *pro)


def gemv_act_and_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *,
                     approximate: str = "none", norm: NormPrologue | None = None) -> torch.Tensor:
    """act(x gate^T) * (x up^T) for x [..., K] with 1 to GEMV_MAX_ROWS rows: the decode step's gate and up
    projections and their activation in one launch on CUDA (of rms_norm(x (+ add)) with ``norm``);
    activation "silu" or "gelu" (``approximate`` "none" or "tanh"). Each projection rounded to x's dtype
    first, as F.linear and silu_and_mul do."""
    pro = _NO_PROLOGUE if norm is None else norm.args()
    return torch.ops.chunkinfer.gemv_act_and_mul(x, gate, up, activation, approximate, *pro)


def gemv_supports(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the gemv ops take x and these weights: 1 to GEMV_MAX_ROWS contiguous rows of a float
    dtype, weights [M, K] contiguous on x's device in its dtype; on CUDA also K a multiple of one
    16-byte vector, x within GEMV_MAX_X_BYTES and every pointer 16-byte aligned. Callers use a matrix
    product otherwise."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not x.is_contiguous() or x.dim() == 0:
        return False
    k = x.shape[-1]
    if k == 0 or not 1 <= x.numel() // k <= GEMV_MAX_ROWS:
        return False
    cuda = x.device.type == "cuda"
    if cuda and (k % (16 // x.element_size()) or x.data_ptr() % 16 or x.numel() * x.element_size() > GEMV_MAX_X_BYTES):
        return False
    return all(w.dim() == 2 and w.shape[1] == k and w.dtype == x.dtype and w.device == x.device
               and w.is_contiguous() and not (cuda and w.data_ptr() % 16) for w in weights)


CUDA_DECODE_HEAD_DIMS = (64, 128, 256)  # head dims decode_attention's CUDA kernel is built for


def decode_kernel_supports(head_dim: int, device: torch.device) -> bool:
    """Whether decode_attention runs for this head dim on this device (the CPU kernel takes any)."""
    return device.type != "cuda" or head_dim in CUDA_DECODE_HEAD_DIMS


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.chunkinfer.<op> has a kernel of its own for CPU, CUDA, Meta..."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"chunkinfer::{op}", dispatch_key)


def build_info() -> dict:
    """What was built: the compiled module's facts, and the running torch's."""
    info = dict(_C.build_info()) if _C is not None else {"cuda": False, "cuda_archs": ""}
    info["compiled"] = _C is not None
    info["load_error"] = _LOAD_ERROR
    info["runtime_torch_version"] = torch.__version__
    info["cuda_kernels"] = _C is not None and has_kernel("silu_and_mul", "CUDA")
    info["cpu_kernels"] = _C is not None and has_kernel("silu_and_mul", "CPU")
    return info
