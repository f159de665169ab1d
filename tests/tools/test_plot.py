"""The bench PNG: every panel has readable ticks and says which way is better; out of memory is marked."""
from __future__ import annotations

import pytest

from chunkinfer.cli import main
from chunkinfer.tools import plot

pytest.importorskip("matplotlib")
GiB = 1 << 30


def rows(decode_ms: list[float], oom_at: int | None = None) -> list[dict]:
    out = []
    for i, n in enumerate((1024, 4096, 16384)):
        for what, mem, ms in (("stock", 2 * n * 1e5, decode_ms[i] * 1.5), ("chunkinfer", n * 1e5, decode_ms[i])):
            oom = what == "stock" and oom_at is not None and n >= oom_at
            out.append({"what": what, "length": n, "label": what, "oom": oom, "error": "OOM" if oom else None,
                        "peak_alloc_beyond_weights": None if oom else mem, "peak_reserved_beyond_weights": None,
                        "tokens_per_s": None if oom else 1000.0 / (i + 1), "ms_per_token": None if oom else ms,
                        "shape": "tiny", "dtype": "float32", "device": "cpu"})
    return out


def visible_tick_labels(ax, axis: str) -> list[str]:
    ax.figure.canvas.draw()
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return [lab.get_text() for t, lab in zip(ticks, labels) if lo <= t <= hi and lab.get_text()]


@pytest.mark.parametrize("decode_ms", [[0.9, 1.0, 1.2],       # within a decade: once showed a single "1"
                                       [1.0, 12.0, 150.0]],   # two decades: a log axis
                         ids=["narrow", "wide"])
def test_every_panel_has_readable_ticks_and_a_direction(decode_ms):
    fig = plot.figure(rows(decode_ms))
    titles = []
    for ax in fig.axes:
        assert len(visible_tick_labels(ax, "y")) >= 3, (ax.get_title(), visible_tick_labels(ax, "y"))
        assert visible_tick_labels(ax, "x") == ["1K", "4K", "16K"]
        titles.append(ax.get_title())
    assert titles == ["memory: lower is better", "prefill: higher is better", "decode: lower is better"]
    decode = fig.axes[2]
    assert (decode.get_yscale() == "log") == (decode_ms[-1] / decode_ms[0] >= plot.LOG_SPAN)
    assert ("log scale" in decode.get_ylabel()) == (decode.get_yscale() == "log")


def test_out_of_memory_is_marked():
    fig = plot.figure(rows([1.0, 2.0, 3.0], oom_at=16384))
    for ax in fig.axes:
        assert any("stock: out of memory\nat 16K tokens" == t.get_text() for t in ax.texts), ax.get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("out of memory") for t in legend)


def test_render_through_the_cli(tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows([0.9, 1.0, 1.2])))
    assert main(["bench", "--plot", str(path), "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 10_000
