"""The planner's view of a model: its shape from a transformers config, with the per-architecture facts
read from the adapters (models/adapters.py), never re-derived here."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..models.adapters import adapter_for_config, check_layer_types, layer_windows, sparse_layers


def load_config(config):
    """A transformers config from a config object, a config.json path or a model directory."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config not found: {path}")
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"cannot load a transformers config from {path}: {exc}") from exc
    if not hasattr(config, "model_type") or not hasattr(config, "to_dict"):
        raise TypeError(f"config must be a transformers PretrainedConfig or a path to config.json, "
                        f"got {type(config).__name__}")
    if config.model_type == "gemma3" and hasattr(config, "text_config"):
        config = config.text_config
    adapter_for_config(config)  # raises for an unsupported model_type, naming the supported ones
    check_layer_types(config)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit soft-capping (config.attn_logit_softcapping) is not supported")
    return config


@dataclass(frozen=True)
class Shape:
    """What the planner needs from a config."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    n_q: int
    n_kv: int
    head_dim: int
    vocab: int
    tied: bool
    windows: tuple  # per layer: sliding window (tokens) or None
    qkv_bias: bool
    mlp_bias: bool
    qk_norm: bool
    gemma_norms: bool
    fused: bool     # Phi-3: qkv_proj and gate_up_proj are single tensors
    norms: int = 2  # RMSNorms over the hidden size per layer (4 with sandwich norms)
    sparse: tuple = ()   # per layer: a mixture-of-experts MLP (else dense, of ``intermediate``)
    experts: int = 0     # mixture of experts: experts per layer, chosen per token, their width, biases
    top_k: int = 0
    expert_intermediate: int = 0
    expert_bias: bool = False
    o_bias: bool = False
    sinks: bool = False  # a sink logit per query head and layer

    @classmethod
    def from_config(cls, config) -> "Shape":
        mt = config.model_type
        for attr in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "vocab_size"):
            v = getattr(config, attr, None)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"config.{attr} must be a positive int, got {v!r}")
        n_q = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_q
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
        if n_q % n_kv:
            raise ValueError(f"{n_q} query heads is not a multiple of {n_kv} KV heads")
        adapter = adapter_for_config(config)
        qkv_bias = adapter.qkv_bias if adapter.qkv_bias is not None else bool(getattr(config, "attention_bias", False))
        moe = adapter.moe
        experts = dict(sparse=sparse_layers(config))
        if moe is not None:
            experts |= dict(experts=getattr(config, moe.experts_attr), top_k=getattr(config, moe.top_k_attr),
                            expert_intermediate=getattr(config, moe.intermediate_attr), expert_bias=moe.bias)
        return cls(model_type=mt, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, n_q=n_q, n_kv=n_kv, head_dim=head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   windows=layer_windows(config), qkv_bias=qkv_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=adapter.qk_norm,
                   gemma_norms=adapter.gemma_norms, fused=adapter.fused_qkv, norms=adapter.norm_count(),
                   o_bias=adapter.o_bias and bool(getattr(config, "attention_bias", False)), sinks=adapter.sinks,
                   **experts)

    def is_sparse(self, layer: int) -> bool:
        return bool(self.sparse) and self.sparse[layer]

    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.n_q * self.head_dim, self.n_kv * self.head_dim
        return h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)

    def mlp_params(self, sparse: bool, experts: int | None = None) -> int:
        """A layer's MLP weights; of a mixture of experts, the router and ``experts`` of them (all by default)."""
        h = self.hidden
        if not sparse:
            i = self.intermediate
            return 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        i = self.expert_intermediate
        one = 3 * h * i + (2 * i + h if self.expert_bias else 0)
        return h * self.experts + (self.experts if self.expert_bias else 0) + one * (
            self.experts if experts is None else experts)

    def layer_linear_params(self, layer: int = 0) -> int:
        """Weights of one layer's projections and MLP (every expert)."""
        return self.attention_params() + self.mlp_params(self.is_sparse(layer))

    def active_linear_params(self, rows: int = 1) -> float:
        """Weights all layers apply to ``rows`` rows: a mixture of experts counts the experts those rows
        choose (at most every expert; ``rows`` = 1: a token's own top-k, the FLOPs of one token)."""
        chosen = min(self.experts, self.top_k * rows)
        return sum(self.attention_params() + self.mlp_params(self.is_sparse(li), chosen) for li in range(self.layers))

    def weight_params(self) -> int:
        norms = self.norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0) + (self.n_q if self.sinks else 0)
        layers = sum(self.layer_linear_params(li) + norms for li in range(self.layers))
        emb = self.vocab * self.hidden
        return layers + emb * (1 if self.tied else 2) + self.hidden

    def kv_bytes_per_token_layer(self, elt: int) -> int:
        return 2 * self.n_kv * self.head_dim * elt

