"""Small random-weight models built from the real transformers config classes, and inputs for them:
what the model tests (tests/e2e, tests/loop, tests/kv, tests/models) compare against stock transformers."""
from __future__ import annotations

import torch
import transformers as T

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "glm", "glm4", "mixtral", "qwen3_moe", "gpt_oss"]
MOE_ARCHS = ["mixtral", "qwen3_moe", "gpt_oss"]


def make_model(arch: str, *, layers: int = 3, dtype=torch.float32, device="cpu", seed: int = 0,
               random_norms: bool | None = None, **overrides):
    """A small random model of ``arch``; ``overrides`` replace config fields (e.g. head_dim=64 for
    the CUDA decode kernel). Norm weights are randomised for Gemma-3 by default (zero-initialised
    (1 + w) norms would hide its rounding path), for any arch with ``random_norms=True``."""
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cls, extra = T.LlamaForCausalLM, {}
    elif arch == "mistral":
        cls, extra = T.MistralForCausalLM, dict(sliding_window=48)
    elif arch == "qwen2":
        cls, extra = T.Qwen2ForCausalLM, {}
    elif arch == "qwen3":
        cls, extra = T.Qwen3ForCausalLM, dict(head_dim=16)
    elif arch == "phi3":
        cls, extra = T.Phi3ForCausalLM, {}
    elif arch == "gemma3":
        types = ["sliding_attention" if (i % 2 == 0) else "full_attention" for i in range(layers)]
        cls, extra = T.Gemma3ForCausalLM, dict(head_dim=16, sliding_window=40, query_pre_attn_scalar=24,
                                               final_logit_softcapping=30.0, layer_types=types)
    elif arch == "glm":
        cls, extra = T.GlmForCausalLM, dict(head_dim=16)  # partial rotary (half the head), q/k/v biases
    elif arch == "glm4":
        cls, extra = T.Glm4ForCausalLM, dict(head_dim=16)
    elif arch == "mixtral":
        cls, extra = T.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)
    elif arch == "qwen3_moe":  # one dense layer among the sparse ones, as mlp_only_layers allows
        cls, extra = T.Qwen3MoeForCausalLM, dict(head_dim=16, num_experts=8, num_experts_per_tok=3,
                                                 moe_intermediate_size=32, norm_topk_prob=True,
                                                 mlp_only_layers=[1] if layers > 1 else [])
    elif arch == "gpt_oss":  # sliding / full layers alternating, sinks, YaRN, biased experts
        types = ["sliding_attention" if (i % 2 == 0) else "full_attention" for i in range(layers)]
        cls, extra = T.GptOssForCausalLM, dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                               intermediate_size=48, sliding_window=24, layer_types=types, max_position_embeddings=131072,
                                               attention_bias=True)
    else:
        raise ValueError(arch)
    cfg = cls.config_class(**{**common, **extra, **overrides})
    cfg._attn_implementation = "eager" if arch == "gpt_oss" else "sdpa"  # sinks: transformers' eager path
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    if random_norms if random_norms is not None else arch == "gemma3":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    with torch.no_grad():  # routers, sinks and biases away from their zero / constant initialisation
        for name, p in model.named_parameters():
            if "sinks" in name or "router" in name or ".gate." in name or name.endswith("bias"):
                p.normal_(0, 0.5 if "sinks" in name else 0.1)
    return model


def left_padded_batch(batch: int, seq: int, pads: list[int], vocab: int = 256, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def max_rel_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (out.float() - ref.float()).abs()
    if mask is not None:
        diff, ref = diff[mask.bool()], ref[mask.bool()]
    return (diff.max() / ref.float().abs().max()).item()
