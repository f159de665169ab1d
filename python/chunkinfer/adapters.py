"""One small description per supported architecture, and the per-layer module bindings built from it.

The layer loop is generic; an adapter only says where a model keeps its modules and which quirks apply.
Weights are always read from the Hugging Face modules at call time (never copied), so ``model.to(...)``
after conversion keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model_devices import ModelDevices, resolve_devices


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its modules, and its quirks."""

    name: str
    fused_qkv: bool = False        # self_attn.qkv_proj instead of q_proj / k_proj / v_proj (Phi-3)
    fused_gate_up: bool = False    # mlp.gate_up_proj (gate | up) instead of gate_proj / up_proj (Phi-3)
    qk_norm: bool = False          # self_attn.q_norm / k_norm over head_dim (Qwen3, Gemma3)
    gemma_norms: bool = False      # RMSNorm scales by (1 + w); sandwich norms around attention and MLP
    rope_per_layer_type: bool = False  # rotary_emb(x, position_ids, layer_type) (Gemma3)
    act_attr: str = "hidden_act"   # config attribute naming the MLP activation


ADAPTERS: dict[str, Adapter] = {
    "LlamaForCausalLM": Adapter("llama"),
    "MistralForCausalLM": Adapter("mistral"),
    "Qwen2ForCausalLM": Adapter("qwen2"),
    "Qwen3ForCausalLM": Adapter("qwen3", qk_norm=True),
    "Phi3ForCausalLM": Adapter("phi3", fused_qkv=True, fused_gate_up=True),
    "Gemma3ForCausalLM": Adapter("gemma3", qk_norm=True, gemma_norms=True, rope_per_layer_type=True,
                                 act_attr="hidden_activation"),
}

_ACTIVATIONS = {  # transformers' ACT2FN name -> (op, approximate)
    "silu": ("silu", "none"), "swish": ("silu", "none"),
    "gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_new": ("gelu", "tanh"),
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


@dataclass
class LayerBinding:
    """A decoder layer's modules and shape facts, resolved once at convert time."""

    index: int
    input_norm: nn.Module
    post_attn_norm: nn.Module          # Llama: before the MLP; Gemma3: on the attention output
    pre_ff_norm: nn.Module | None      # Gemma3 only
    post_ff_norm: nn.Module | None     # Gemma3 only
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    qkv: tuple[nn.Linear, ...]         # (q, k, v) or (qkv,)
    o_proj: nn.Linear
    gate_up: tuple[nn.Linear, ...]     # (gate, up) or (gate_up,)
    down: nn.Linear
    n_q: int
    n_kv: int
    head_dim: int
    scale: float
    window: int | None                 # sliding window, or None for full attention
    rope_key: str | None               # Gemma3's layer type selecting its rotary parameters


@dataclass
class ModelBinding:
    """Everything the loop needs from one model."""

    adapter: Adapter
    embed: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    layers: list[LayerBinding]
    act: str                # "silu" | "gelu"
    act_approximate: str
    norm_eps: float
    final_softcap: float | None
    rope_needs_global_max: bool  # dynamic / longrope: frequencies depend on the call's max position
    devices: ModelDevices | None = None  # where each part runs (set by bind)


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")
    return float(eps)


def _window(config, attn: nn.Module, layer_idx: int) -> int | None:
    if hasattr(attn, "sliding_window"):  # Qwen2/3, Gemma3: per layer type
        return attn.sliding_window
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)  # Mistral, Phi-3: every layer


def _rope_types(rotary: nn.Module) -> list[str]:
    rt = getattr(rotary, "rope_type", "default")
    return list(rt.values()) if isinstance(rt, dict) else [rt]


def bind(model: nn.Module) -> ModelBinding:
    """Resolve a model's modules through its adapter. Raises (TypeError / ValueError) without touching
    the model when it is not supported."""
    cls = type(model).__name__
    adapter = ADAPTERS.get(cls)
    if adapter is None:
        raise TypeError(f"chunkinfer.convert: unsupported model class {cls}; supported: "
                        f"{', '.join(supported_architectures())}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError("chunkinfer.convert: encoder-decoder models are not supported")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("chunkinfer.convert: attention logit soft-capping (config.attn_logit_softcapping) "
                         "is not supported by the fused attention kernels")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("chunkinfer.convert: use_bidirectional_attention=True is not supported")
    act_name = getattr(config, adapter.act_attr, None)
    if act_name not in _ACTIVATIONS:
        raise ValueError(f"chunkinfer.convert: unsupported activation {act_name!r} "
                         f"(supported: {', '.join(_ACTIVATIONS)})")
    try:
        inner = model.model
        layers = []
        for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = (attn.qkv_proj,) if adapter.fused_qkv else (attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up = (mlp.gate_up_proj,) if adapter.fused_gate_up else (mlp.gate_proj, mlp.up_proj)
            n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
            head_dim = getattr(attn, "head_dim", None) or config.hidden_size // n_q
            layers.append(LayerBinding(
                index=i, input_norm=layer.input_layernorm, post_attn_norm=layer.post_attention_layernorm,
                pre_ff_norm=layer.pre_feedforward_layernorm if adapter.gemma_norms else None,
                post_ff_norm=layer.post_feedforward_layernorm if adapter.gemma_norms else None,
                q_norm=attn.q_norm if adapter.qk_norm else None, k_norm=attn.k_norm if adapter.qk_norm else None,
                qkv=qkv, o_proj=attn.o_proj, gate_up=gate_up, down=mlp.down_proj,
                n_q=n_q, n_kv=n_kv, head_dim=head_dim, scale=float(attn.scaling),
                window=_window(config, attn, i),
                rope_key=config.layer_types[i] if adapter.rope_per_layer_type else None,
            ))
        binding = ModelBinding(
            adapter=adapter, embed=inner.embed_tokens, final_norm=inner.norm, lm_head=model.lm_head,
            rotary=inner.rotary_emb, layers=layers, act=_ACTIVATIONS[act_name][0],
            act_approximate=_ACTIVATIONS[act_name][1], norm_eps=_eps(inner.norm),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            rope_needs_global_max=any(("dynamic" in t or "longrope" in t) for t in _rope_types(inner.rotary_emb)),
        )
    except AttributeError as exc:
        raise TypeError(f"chunkinfer.convert: {cls} does not have the module layout of its adapter "
                        f"({adapter.name}): {exc}") from exc
    for lb in layers:  # validated here so the loop never checks
        _eps(lb.input_norm)
        if lb.n_q % lb.n_kv:
            raise ValueError(f"layer {lb.index}: {lb.n_q} query heads not a multiple of {lb.n_kv} KV heads")
    binding.devices = resolve_devices(model, list(inner.layers[: config.num_hidden_layers]), inner.embed_tokens,
                                      inner.norm, model.lm_head)
    return binding
