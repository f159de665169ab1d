"""Loading the compiled ops: the schemas, the compiled module or (if it cannot load) the plain-PyTorch
references registered under the same names, the fake (Meta) kernels torch.compile traces with, and
``build_info()``. Importing this module registers everything; ``chunkinfer.ops`` holds the typed wrappers.
"""
from __future__ import annotations

import importlib
import inspect
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
    "decode_attention": "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0, bool prefix_ready=False, int split_keys=0) -> (Tensor, Tensor)",
    "decode_attention_out": "decode_attention_out(Tensor(a!) out, Tensor(b!) lse, Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0, bool prefix_ready=False, int split_keys=0) -> ()",
    "merge_attn_states": "merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)",
    "merge_attn_states_out": "merge_attn_states_out(Tensor(a!) out, Tensor(b!) lse, Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> ()",
    "gemv": "gemv(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? norm_weight=None, float eps=0.0, bool gemma=False, Tensor? add=None, Tensor(a!)? residual_out=None) -> Tensor",
    "gemv_act_and_mul": "gemv_act_and_mul(Tensor x, Tensor gate, Tensor up, str activation, str approximate='none', Tensor? norm_weight=None, float eps=0.0, bool gemma=False, Tensor? add=None, Tensor(a!)? residual_out=None) -> Tensor",
    "rotary_kv_write": "rotary_kv_write(Tensor(a!)? q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor index) -> ()",
}

try:
    # the extension module by its own name, not through the package's namespace (whose __init__ imports
    # this module); loading it registers the ops
    extension = importlib.import_module("chunkinfer._C")

    LOAD_ERROR: str | None = None
except ImportError as exc:  # a broken or missing build: fall back, loudly
    extension = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"chunkinfer: compiled ops unavailable, using the PyTorch reference ({LOAD_ERROR})")


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

    def decode(q, k_cache, v_cache, seq_lens, starts=None, scale=None, window=0, prefix_ready=False, split_keys=0):
        return reference.decode_attention(q, k_cache, v_cache, seq_lens, starts, scale, window, split_keys)

    def decode_out(out, lse, q, k_cache, v_cache, seq_lens, starts=None, scale=None, window=0, prefix_ready=False,
                   split_keys=0):
        o, l = decode(q, k_cache, v_cache, seq_lens, starts, scale, window, split_keys)
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

    def row_by_row(fn):
        """A reference gemv op one row at a time (x, add and residual_out split into rows alike): a row's
        result then does not depend on the call's other rows, as the compiled kernels promise (a matrix
        product's may)."""
        signature = inspect.signature(fn)

        def each_row(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x, k = a["x"], a["x"].shape[-1]
            rows = []
            for i in range(x.numel() // k):
                one = {name: None if a[name] is None else a[name].reshape(-1, k)[i:i + 1] for name in ("x", "add")}
                if a["residual_out"] is not None:  # written in place: a view
                    one["residual_out"] = a["residual_out"].view(-1, k)[i:i + 1]
                rows.append(fn(**{**a, **one}))
            out = torch.cat(rows)
            return out.view(*x.shape[:-1], out.shape[-1])
        return each_row

    impls = {
        "silu_and_mul": reference.silu_and_mul, "silu_and_mul_out": silu_out,
        "gelu_and_mul": reference.gelu_and_mul, "gelu_and_mul_out": gelu_out,
        "rms_norm": reference.rms_norm, "rms_norm_out": rms_out, "fused_add_rms_norm": fused,
        "decode_attention": decode, "decode_attention_out": decode_out,
        "merge_attn_states": reference.merge_attn_states, "merge_attn_states_out": merge_out,
        "rotary_kv_write": rotary_write, "gemv": row_by_row(reference.gemv),
        "gemv_act_and_mul": row_by_row(reference.gemv_act_and_mul),
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
    def _(q, k_cache, v_cache, seq_lens, starts=None, scale=None, window=0, prefix_ready=False, split_keys=0):
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


if extension is None:
    _register_reference_ops()
else:
    _register_fakes()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.chunkinfer.<op> has a kernel of its own for CPU, CUDA, Meta..."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"chunkinfer::{op}", dispatch_key)


def build_info() -> dict:
    """What was built: the compiled module's facts, and the running torch's."""
    info = dict(extension.build_info()) if extension is not None else {"cuda": False, "cuda_archs": ""}
    info["compiled"] = extension is not None
    info["load_error"] = LOAD_ERROR
    info["runtime_torch_version"] = torch.__version__
    info["cuda_kernels"] = extension is not None and has_kernel("silu_and_mul", "CUDA")
    info["cpu_kernels"] = extension is not None and has_kernel("silu_and_mul", "CPU")
    return info


# ---- lossless KV codec (csrc/kv_codec_format.h): its schemas, and references or fakes as above ----
KV_CODEC_SCHEMAS = {
    "kv_encode": "kv_encode(Tensor x, Tensor table, int block_rows=16, int escape_capacity=16, int spill_blocks=-1) -> (Tensor, Tensor, Tensor)",
    "kv_encode_out": "kv_encode_out(Tensor(a!) blocks, Tensor(b!) spill, Tensor(c!) spill_used, Tensor x, Tensor table, int block_rows=16, int escape_capacity=16) -> ()",
    "kv_decode": "kv_decode(Tensor blocks, Tensor spill, Tensor table, int rows, int head_dim, ScalarType dtype, int block_rows=16, int escape_capacity=16) -> Tensor",
    "kv_decode_out": "kv_decode_out(Tensor(a!) out, Tensor blocks, Tensor spill, Tensor table, int block_rows=16, int escape_capacity=16) -> ()",
    "decode_attention_kv_codec": "decode_attention_kv_codec(Tensor q, Tensor k_blocks, Tensor k_spill, Tensor k_table, Tensor v_blocks, Tensor v_spill, Tensor v_table, Tensor seq_lens, Tensor? starts=None, float? scale=None, int block_rows=16, int k_escape_capacity=16, int v_escape_capacity=16, int split_keys=0) -> (Tensor, Tensor)",
}
SCHEMAS.update(KV_CODEC_SCHEMAS)
HOST_ONLY_OPS = frozenset({"decode_attention_kv_codec"})  # attention over host KV: a CPU kernel only


def _register_kv_codec_reference_ops() -> None:
    lib = torch.library.Library("chunkinfer", "FRAGMENT")  # noqa: F841 (kept alive by the registry)
    _register_kv_codec_reference_ops.lib = lib
    for name, schema in KV_CODEC_SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")


def _register_kv_codec_fakes() -> None:
    import math

    from .kv_codec import KVCodecLayout

    @torch.library.register_fake("chunkinfer::kv_encode")
    def _(x, table, block_rows=16, escape_capacity=16, spill_blocks=-1):
        lay = KVCodecLayout(x.dtype, x.shape[-1], block_rows, escape_capacity)
        nb = lay.num_blocks(x.shape[-2])
        cap = math.prod(x.shape[:-2]) * nb if spill_blocks < 0 else spill_blocks
        return (x.new_empty([*x.shape[:-2], nb, lay.slot_bytes], dtype=torch.uint8),
                x.new_empty([cap, lay.spill_unit_bytes], dtype=torch.uint8), x.new_empty([1], dtype=torch.int32))

    @torch.library.register_fake("chunkinfer::kv_decode")
    def _(blocks, spill, table, rows, head_dim, dtype, block_rows=16, escape_capacity=16):
        return blocks.new_empty([*blocks.shape[:-2], rows, head_dim], dtype=dtype)

    @torch.library.register_fake("chunkinfer::decode_attention_kv_codec")
    def _(q, k_blocks, k_spill, k_table, v_blocks, v_spill, v_table, seq_lens, starts=None, scale=None,
          block_rows=16, k_escape_capacity=16, v_escape_capacity=16, split_keys=0):
        return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)

    for name in ("kv_encode_out", "kv_decode_out"):
        torch.library.register_fake(f"chunkinfer::{name}")(lambda *args, **kwargs: None)


if extension is None:
    _register_kv_codec_reference_ops()
else:
    _register_kv_codec_fakes()
