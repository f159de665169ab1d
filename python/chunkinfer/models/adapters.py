"""One small description per supported architecture, and the per-layer module bindings built from it.

The layer loop is generic; an adapter only says where a model keeps its modules and which quirks apply.
Weights are always read from the Hugging Face modules at call time (never copied), so ``model.to(...)``
after conversion keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .devices import ModelDevices, resolve_devices


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts MLP as transformers lays it out: ``mlp.<router>`` returns (logits, routing
    weights, expert indices) for rows [N, H] (its own top-k and normalisation, which the loop calls as
    is), ``mlp.experts`` holds every expert's weights stacked and its ``_apply_gate``."""

    router: str                    # attribute of the router module under mlp ("gate", "router")
    transposed: bool = False       # experts' weights [E, in, out] (x @ W) instead of [E, out, in] (F.linear)
    bias: bool = False             # gate_up_proj_bias / down_proj_bias
    experts_attr: str = "num_local_experts"  # config attributes the planner reads
    top_k_attr: str = "num_experts_per_tok"
    intermediate_attr: str = "intermediate_size"


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its modules, and its quirks: the one place that knows them (the layer
    loop and the planner both read it)."""

    name: str
    model_types: tuple[str, ...]   # config.model_type values of this architecture
    label: str                     # the name users know it by
    fused_qkv: bool = False        # self_attn.qkv_proj instead of q_proj / k_proj / v_proj (Phi-3)
    fused_gate_up: bool = False    # mlp.gate_up_proj (gate | up) instead of gate_proj / up_proj (Phi-3, GLM)
    qk_norm: bool = False          # self_attn.q_norm / k_norm over head_dim (Qwen3, Gemma3)
    gemma_norms: bool = False      # RMSNorm scales by (1 + w) (Gemma3)
    mlp_norm: str = "post_attention_layernorm"  # the norm before the MLP
    attn_out_norm: str | None = None  # a norm on the attention output before the residual add (sandwich)
    mlp_out_norm: str | None = None   # a norm on the MLP output before the residual add (sandwich)
    rope_per_layer_type: bool = False  # rotary_emb(x, position_ids, layer_type) (Gemma3)
    rope_half_tables: bool = False  # rotary_emb returns cos, sin of D/2 (each half rotated by them: gpt-oss)
    rope_interleaved: bool = False  # rotary pairs (2i, 2i + 1) instead of (i, i + R/2) (GLM)
    sinks: bool = False            # self_attn.sinks: a learned logit per head in the softmax denominator (gpt-oss)
    moe: MoeSpec | None = None     # the MLP of layers whose mlp has ``experts`` (others are dense)
    act_attr: str = "hidden_act"   # config attribute naming the MLP activation
    qkv_bias: bool | None = None   # q/k/v projections carry a bias regardless of the config (Qwen2); None: config.attention_bias
    o_bias: bool = False           # o_proj carries a bias when config.attention_bias does (Llama, gpt-oss)

    def norm_count(self) -> int:
        """RMSNorms per decoder layer over the hidden size."""
        return 2 + (self.attn_out_norm is not None) + (self.mlp_out_norm is not None)


_GEMMA_NORMS = dict(gemma_norms=True, mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                    mlp_out_norm="post_feedforward_layernorm")
_GLM4_NORMS = dict(attn_out_norm="post_self_attn_layernorm", mlp_out_norm="post_mlp_layernorm")

ADAPTERS: dict[str, Adapter] = {
    "LlamaForCausalLM": Adapter("llama", ("llama",), "Llama", o_bias=True),
    "MistralForCausalLM": Adapter("mistral", ("mistral",), "Mistral"),
    "Qwen2ForCausalLM": Adapter("qwen2", ("qwen2",), "Qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": Adapter("qwen3", ("qwen3",), "Qwen3", qk_norm=True),
    "Phi3ForCausalLM": Adapter("phi3", ("phi3",), "Phi-3", fused_qkv=True, fused_gate_up=True),
    "Gemma3ForCausalLM": Adapter("gemma3", ("gemma3_text", "gemma3"), "Gemma-3", qk_norm=True,
                                 rope_per_layer_type=True, act_attr="hidden_activation", **_GEMMA_NORMS),
    "GlmForCausalLM": Adapter("glm", ("glm",), "GLM", fused_gate_up=True, rope_interleaved=True),
    "Glm4ForCausalLM": Adapter("glm4", ("glm4",), "GLM-4", fused_gate_up=True, rope_interleaved=True, **_GLM4_NORMS),
    "MixtralForCausalLM": Adapter("mixtral", ("mixtral",), "Mixtral", moe=MoeSpec("gate")),
    "Qwen3MoeForCausalLM": Adapter("qwen3_moe", ("qwen3_moe",), "Qwen3-MoE", qk_norm=True,
                                   moe=MoeSpec("gate", experts_attr="num_experts",
                                               intermediate_attr="moe_intermediate_size")),
    "GptOssForCausalLM": Adapter("gpt_oss", ("gpt_oss",), "gpt-oss", rope_half_tables=True, sinks=True, o_bias=True,
                                 moe=MoeSpec("router", transposed=True, bias=True)),
}

# rope types whose tables the model's rotary module computes from the positions alone (dynamic and
# longrope also from the call's largest position, which the loop passes); any other is refused
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

_ACTIVATIONS = {  # transformers' ACT2FN name -> (op, approximate)
    "silu": ("silu", "none"), "swish": ("silu", "none"),
    "gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_new": ("gelu", "tanh"),
}


def adapter_for_config(config) -> Adapter:
    """The adapter of a config's model_type; ValueError naming the supported ones otherwise."""
    for adapter in ADAPTERS.values():
        if config.model_type in adapter.model_types:
            return adapter
    known = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    labels = sorted({a.label for a in ADAPTERS.values()})
    raise ValueError(f"unsupported model_type {config.model_type!r}; chunkinfer supports "
                     f"{', '.join(labels)} ({', '.join(known)})")


def layer_windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window in tokens, or None for full attention, as transformers' attention
    modules read the config: ``layer_types`` where the config has them, else every layer alike;
    ``use_sliding_window=False`` (Qwen2/3) switches windows off."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return (None,) * n
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window,) * n
    if len(layer_types) < n:
        raise ValueError(f"config.layer_types has {len(layer_types)} entries for {n} layers")
    return tuple(window if t == "sliding_attention" else None for t in layer_types[:n])


def check_layer_types(config) -> None:
    """ValueError naming a layer type the loop does not run (anything but full and sliding attention)."""
    unknown = sorted({t for t in (getattr(config, "layer_types", None) or ())[: config.num_hidden_layers]
                      if t not in LAYER_TYPES})
    if unknown:
        raise ValueError(f"chunkinfer.convert: layer type(s) {', '.join(map(repr, unknown))} in config.layer_types "
                         f"are not supported (supported: {', '.join(LAYER_TYPES)})")


def sparse_layers(config) -> tuple[bool, ...]:
    """Per layer whether its MLP is a mixture of experts, as transformers builds it: every layer of a
    family with experts, except Qwen3-MoE's ``mlp_only_layers`` and those off its ``decoder_sparse_step``."""
    adapter = adapter_for_config(config)
    n = config.num_hidden_layers
    if adapter.moe is None:
        return (False,) * n
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(n))


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


@dataclass
class LayerBinding:
    """A decoder layer's modules and shape facts, resolved once at convert time."""

    index: int
    input_norm: nn.Module              # before attention
    attn_out_norm: nn.Module | None    # on the attention output before the residual add (Gemma3's sandwich)
    mlp_norm: nn.Module                # before the MLP (Llama: post_attention_layernorm; Gemma3: pre_feedforward)
    mlp_out_norm: nn.Module | None     # on the MLP output before the residual add (Gemma3's sandwich)
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    qkv: tuple[nn.Linear, ...]         # (q, k, v) or (qkv,)
    o_proj: nn.Linear
    gate_up: tuple[nn.Linear, ...]     # (gate, up) or (gate_up,); () for a mixture-of-experts MLP
    down: nn.Linear | None             # None for a mixture-of-experts MLP
    n_q: int
    n_kv: int
    head_dim: int
    scale: float
    window: int | None                 # sliding window, or None for full attention
    rope_key: str | None               # Gemma3's layer type selecting its rotary parameters
    sinks: torch.Tensor | None = None  # [Hq] attention-sink logits (gpt-oss), read at call time
    router: nn.Module | None = None    # mixture of experts: the router (logits, weights, indices) ...
    experts: nn.Module | None = None   # ... and the stacked experts

    @property
    def intermediate(self) -> int:
        """Width of the dense MLP's activation (0 for a mixture of experts)."""
        return 0 if self.down is None else self.down.weight.shape[1]


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
    memo: dict = field(default_factory=dict)  # answers that depend on the weights alone (loop/step.py)

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention): what the cache's layers are sized by."""
        return [lb.window for lb in self.layers]


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")
    return float(eps)


def _rope_types(rotary: nn.Module) -> list[str]:
    rt = getattr(rotary, "rope_type", "default")
    return list(rt.values()) if isinstance(rt, dict) else [rt]


def _check_rope(rotary: nn.Module) -> None:
    unknown = sorted({t for t in _rope_types(rotary) if t not in ROPE_TYPES})
    if unknown:
        raise ValueError(f"chunkinfer.convert: rope type(s) {', '.join(map(repr, unknown))} are not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")


def _mlp_modules(adapter: Adapter, mlp: nn.Module) -> tuple:
    """(gate_up, down, router, experts) of one layer's MLP: dense, or a mixture of experts."""
    if adapter.moe is not None and hasattr(mlp, "experts"):
        experts = mlp.experts
        for name in ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if adapter.moe.bias else ()):
            if not isinstance(getattr(experts, name, None), torch.Tensor) or getattr(experts, name).dim() not in (2, 3):
                raise TypeError(f"{type(experts).__name__}.{name} is not a stacked expert tensor (quantised "
                                "experts are not supported: load the model in a float dtype)")
        return (), None, getattr(mlp, adapter.moe.router), experts
    gate_up = (mlp.gate_up_proj,) if adapter.fused_gate_up else (mlp.gate_proj, mlp.up_proj)
    return gate_up, mlp.down_proj, None, None


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
    check_layer_types(config)
    windows = layer_windows(config)
    try:
        inner = model.model
        _check_rope(inner.rotary_emb)
        layers = []
        for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = (attn.qkv_proj,) if adapter.fused_qkv else (attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up, down, router, experts = _mlp_modules(adapter, mlp)
            n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
            head_dim = getattr(attn, "head_dim", None) or config.hidden_size // n_q
            layers.append(LayerBinding(
                index=i, input_norm=layer.input_layernorm,
                attn_out_norm=getattr(layer, adapter.attn_out_norm) if adapter.attn_out_norm else None,
                mlp_norm=getattr(layer, adapter.mlp_norm),
                mlp_out_norm=getattr(layer, adapter.mlp_out_norm) if adapter.mlp_out_norm else None,
                q_norm=attn.q_norm if adapter.qk_norm else None, k_norm=attn.k_norm if adapter.qk_norm else None,
                qkv=qkv, o_proj=attn.o_proj, gate_up=gate_up, down=down,
                n_q=n_q, n_kv=n_kv, head_dim=head_dim, scale=float(attn.scaling),
                window=windows[i],
                rope_key=config.layer_types[i] if adapter.rope_per_layer_type else None,
                sinks=attn.sinks if adapter.sinks else None, router=router, experts=experts,
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
