"""The adapters: each family's declaration binds its real modules; what the loop cannot run is refused at
convert() with a message naming it, and the model is left untouched."""
from __future__ import annotations

import pytest
import torch

import chunkinfer
from chunkinfer.models.adapters import ADAPTERS, bind, layer_windows, sparse_layers
from chunkinfer.planner.shape import Shape
from tests.tiny_models import ARCHS, make_model


@pytest.mark.parametrize("arch", ARCHS)
def test_binding_resolves_every_layer(arch):
    model = make_model(arch, layers=4)
    mb = bind(model)
    assert type(model).__name__ in ADAPTERS and len(mb.layers) == 4
    for lb, layer in zip(mb.layers, model.model.layers):
        assert (lb.experts is not None) == hasattr(layer.mlp, "experts")
        assert (lb.sinks is not None) == hasattr(layer.self_attn, "sinks")
    assert mb.windows == list(layer_windows(model.config))


def test_moe_layers_follow_the_config():
    model = make_model("qwen3_moe", layers=4)
    assert sparse_layers(model.config) == (True, False, True, True)
    assert [lb.experts is not None for lb in bind(model).layers] == [True, False, True, True]
    shape = Shape.from_config(model.config)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n
                 and "norm" not in n)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.weight_params() == params + norms + 2 * model.config.vocab_size * model.config.hidden_size


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral", "glm4", "gemma3", "llama"])
def test_planner_counts_the_real_weights(arch):
    model = make_model(arch, layers=2)
    shape = Shape.from_config(model.config)
    assert shape.weight_params() == sum(p.numel() for p in model.parameters())  # a tied head is one tensor


def _state(model):
    return (type(model).forward, dict(vars(model)).get("forward"), getattr(model, "_chunkinfer", None))


def test_unknown_rope_type_is_refused_and_model_untouched():
    model = make_model("llama")
    model.model.rotary_emb.rope_type = "made_up"
    before = _state(model)
    with pytest.raises(ValueError, match="rope type.*'made_up'.*supported"):
        chunkinfer.convert(model)
    assert _state(model) == before


def test_unknown_layer_type_is_refused_and_model_untouched():
    model = make_model("gemma3")
    model.config.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    before = _state(model)
    with pytest.raises(ValueError, match="layer type.*'chunked_attention'"):
        chunkinfer.convert(model)
    assert _state(model) == before


def test_quantised_experts_are_refused():
    model = make_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    del experts.gate_up_proj
    experts.gate_up_proj = torch.zeros(1)  # not a stacked [E, 2I, H] tensor
    with pytest.raises(TypeError, match="stacked expert"):
        chunkinfer.convert(model)


def test_unsupported_model_lists_the_new_families():
    with pytest.raises(TypeError, match="GptOssForCausalLM.*Qwen3MoeForCausalLM"):
        chunkinfer.convert(torch.nn.Linear(2, 2).__class__.__new__(type("FooForCausalLM", (torch.nn.Module,), {})))
