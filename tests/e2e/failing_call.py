"""For the failure tests: a call that raises part-way through the layer loop."""
from __future__ import annotations

from torch import nn

from chunkinfer.loop import layer as layer_loop


def raise_at_projection(monkeypatch, module: nn.Module) -> None:
    """Until ``monkeypatch.undo()``, the layer loop raises RuntimeError("boom") when it projects through
    ``module`` (after everything before it in the call has run)."""
    linear = layer_loop.linear

    def failing(x, m, gemv_rows=1):
        if m is module:
            raise RuntimeError("boom")
        return linear(x, m, gemv_rows)

    monkeypatch.setattr(layer_loop, "linear", failing)
