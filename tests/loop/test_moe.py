"""The mixture-of-experts MLP (loop/moe.py) against each family's stock sparse block, on rows grouped
by expert (blocks) and on gathered experts (steps of a few rows)."""
from __future__ import annotations

import pytest
import torch

from chunkinfer.loop import moe
from chunkinfer.models.adapters import bind
from tests.tiny_models import MOE_ARCHS, make_model


def _stock(mlp, h):
    out = mlp(h)
    return out[0] if isinstance(out, tuple) else out  # gpt-oss returns (out, router scores)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("rows", [1, 3, 57])  # gathered experts, and grouped by expert
def test_moe_matches_stock_block(arch, rows):
    model = make_model(arch, layers=1)
    mb = bind(model)
    h = torch.randn(1, rows, model.config.hidden_size)
    with torch.no_grad():
        ref = _stock(model.model.layers[0].mlp, h)
        out = moe.moe_mlp(mb.layers[0], mb.adapter.moe, h)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_bf16_matches_stock_rounding(arch):
    model = make_model(arch, layers=1, dtype=torch.bfloat16)
    mb = bind(model)
    h = torch.randn(2, 40, model.config.hidden_size).bfloat16()
    with torch.no_grad():
        ref = _stock(model.model.layers[0].mlp, h)
        out = moe.moe_mlp(mb.layers[0], mb.adapter.moe, h)
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()


def test_step_reads_only_the_chosen_experts(monkeypatch):
    model = make_model("qwen3_moe", layers=1)
    mb = bind(model)
    experts = mb.layers[0].experts
    chosen = []
    real = torch.Tensor.index_select

    def spy(t, dim, index):
        if t is experts.gate_up_proj or t is experts.down_proj:
            chosen.append(sorted(index.tolist()))
        return real(t, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    h = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        moe.moe_mlp(mb.layers[0], mb.adapter.moe, h)
        _, _, idx = mb.layers[0].router(h.view(1, -1))
    assert chosen == [sorted(idx[0].tolist())] * 2 and len(chosen[0]) == model.config.num_experts_per_tok
