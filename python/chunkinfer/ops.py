"""Typed wrappers over torch.ops.chunkinfer, and the fake (Meta) kernels torch.compile traces with.

The schemas are defined in C++ (csrc/registration.cpp). If the compiled extension cannot be loaded,
the same schemas are registered here with the reference implementations, so model code and
torch.compile behave the same everywhere; ``build_info()`` says which happened.
"""
from __future__ import annotations

import warnings

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

    impls = {
        "silu_and_mul": reference.silu_and_mul, "silu_and_mul_out": silu_out,
        "gelu_and_mul": reference.gelu_and_mul, "gelu_and_mul_out": gelu_out,
        "rms_norm": reference.rms_norm, "rms_norm_out": rms_out, "fused_add_rms_norm": fused,
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

    for name in ("silu_and_mul_out", "gelu_and_mul_out", "rms_norm_out", "fused_add_rms_norm"):
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
