"""torch.compile(fullgraph=True) traces functions that call the ops (fake kernels + functionalisation)."""
from __future__ import annotations

import pytest
import torch

from chunkinfer import ops
from tests.conftest import TOLERANCE, randn, rel_err


def block(x, residual, w_attn, w_ffn, gate_up):
    """A decoder-layer-shaped use: fused norm in place, then the streamed FFN into a buffer."""
    ops.fused_add_rms_norm(x, residual, w_attn, 1e-6)
    act = torch.empty(x.shape[0], gate_up.shape[-1] // 2, dtype=x.dtype, device=x.device)
    ops.silu_and_mul(x @ gate_up, out=act)
    y = ops.gelu_and_mul(x @ gate_up, approximate="tanh")
    return ops.rms_norm(act + y, w_ffn, 1e-6, gemma=True), residual


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend, gen):
    torch._dynamo.reset()
    x = randn((6, 32), torch.float32, "cpu", gen)
    residual = randn((6, 32), torch.float32, "cpu", gen)
    w1, w2 = randn((32,), torch.float32, "cpu", gen), randn((16,), torch.float32, "cpu", gen)
    gate_up = randn((32, 32), torch.float32, "cpu", gen)
    want, want_res = block(x.clone(), residual.clone(), w1, w2, gate_up)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    res = residual.clone()
    got, got_res = compiled(x.clone(), res, w1, w2, gate_up)
    assert rel_err(got, want) <= TOLERANCE[torch.float32]
    assert rel_err(res, want_res) <= TOLERANCE[torch.float32], "in-place residual update lost under compile"
