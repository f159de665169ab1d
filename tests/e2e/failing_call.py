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


def continuation_survives_a_failure(monkeypatch, reference, model, ids, more, module: nn.Module):
    """Run ``ids`` through both models, fail ``model``'s continuation by ``more`` at ``module`` (the
    cache must keep its length), then continue both: returns (reference's, model's) outputs and caches."""
    a = reference(ids, use_cache=True)
    b = model(ids, use_cache=True)
    raise_at_projection(monkeypatch, module)
    try:
        model(more, past_key_values=b.past_key_values, use_cache=True)
    except RuntimeError as exc:
        assert str(exc) == "boom", exc
    else:
        raise AssertionError("the continuation did not fail")
    finally:
        monkeypatch.undo()
    assert all(layer.length == ids.shape[1] for layer in b.past_key_values.layers)
    a2 = reference(more, past_key_values=a.past_key_values, use_cache=True)
    b2 = model(more, past_key_values=b.past_key_values, use_cache=True)
    return a2, b2
