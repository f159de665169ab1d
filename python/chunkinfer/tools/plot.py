"""The PNG of ``chunkinfer bench`` rows: peak memory, prefill tokens/s and decode ms/token against context
length, one line per system, each system's out-of-memory point marked. Needs matplotlib
(``pip install matplotlib``); the rows are plain JSON lines, so they can be plotted later."""
from __future__ import annotations

import json
from pathlib import Path

GiB = 1 << 30
# colour, line style, marker per system; stock warm colours, chunkinfer cool; offloaded dashed
STYLES = {"stock": ("tab:red", "-", "o"), "stock-offload": ("tab:orange", "--", "s"),
          "chunkinfer": ("tab:blue", "-", "o"), "chunkinfer-offload": ("tab:green", "--", "^")}
# key, y label, direction (the panel's title says which way is better), log scale when the values span a decade
PANELS = [("peak_alloc_beyond_weights", "peak {memory} beyond weights ({unit})", "lower"),
          ("tokens_per_s", "prefill throughput (tokens/s)", "higher"),
          ("ms_per_token", "decode step (ms/token)", "lower")]
TITLES = {"peak_alloc_beyond_weights": "memory", "tokens_per_s": "prefill", "ms_per_token": "decode"}
LOG_SPAN = 10.0   # a panel whose values span at least this ratio gets a log axis (1-2-5 ticks); else linear
MATPLOTLIB_HINT = "pip install matplotlib"


def load_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rows file {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from None
        if not isinstance(r, dict) or "what" not in r or "length" not in r:
            raise ValueError(f"{path}:{n}: not a chunkinfer bench row (needs 'what' and 'length')")
        rows.append(r)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def tokens_label(n: int) -> str:
    for size, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= size and n % (size // 4) == 0:
            v = n / size
            return f"{v:g}{unit}"
    return str(n)


def _series(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """system -> length -> row (a later row for the same system and length replaces an earlier one)."""
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r.get("skipped"):
            continue
        out.setdefault(r["what"], {})[r["length"]] = r
    return out


def _memory_unit(rows: list[dict]) -> tuple[str, float]:
    peaks = [r.get(k) or 0 for r in rows for k in ("peak_alloc_beyond_weights", "peak_reserved_beyond_weights")]
    return ("GiB", 1 / GiB) if max(peaks, default=0) >= GiB else ("MiB", 1 / (1 << 20))


def render(rows: list[dict], out_path: str | Path) -> Path:
    """Writes the PNG; returns its path."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def figure(rows: list[dict]):
    """The matplotlib figure of the rows: one panel per measure."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(f"plotting needs matplotlib: {MATPLOTLIB_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    series = _series(rows)
    if not series:
        raise ValueError("no measured rows to plot (every row was skipped)")
    lengths = sorted({n for by_len in series.values() for n in by_len})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 5.4))
    handles: list = []
    any_reserved = False
    unit, mem_scale = _memory_unit(rows)
    memory = "memory" if rows[0].get("device_memory_bytes") else "resident memory (RSS)"
    for ax, (key, ylabel, better) in zip(axes, PANELS):
        scale = mem_scale if key == "peak_alloc_beyond_weights" else 1.0
        ylabel = ylabel.format(memory=memory, unit=unit)
        on_top = blended_transform_factory(ax.transData, ax.transAxes)
        n_oom = 0  # out-of-memory crosses near the top of each panel (axes coordinates), one row per system
        values: list[float] = []
        for name, by_len in series.items():
            color, ls, marker = STYLES.get(name, (None, "-", "o"))
            label = next(iter(by_len.values())).get("label", name)
            ok = [(n, r[key] * scale) for n, r in sorted(by_len.items()) if not r.get("error") and r.get(key) is not None]
            line = None
            values += [v for _, v in ok]
            if ok:
                (line,) = ax.plot(*zip(*ok), ls=ls, marker=marker, color=color, lw=2, ms=6, label=label)
                color = line.get_color()
            if key == "peak_alloc_beyond_weights":
                res = [(n, r["peak_reserved_beyond_weights"] * scale) for n, r in sorted(by_len.items())
                       if not r.get("error") and r.get("peak_reserved_beyond_weights") is not None]
                if res:
                    any_reserved = True
                    ax.plot(*zip(*res), ls=":", color=color, lw=1.2, alpha=0.8)
            ooms = sorted(n for n, r in by_len.items() if r.get("oom"))
            if ooms:
                marker_y = 0.93 - 0.14 * n_oom
                n_oom += 1
                ax.axvline(ooms[0], color=color, ls=":", lw=1.5)
                ax.plot([ooms[0]], [marker_y], transform=on_top, marker="X", ms=16, color=color,
                        markeredgecolor="black", ls="none", clip_on=False)
                ax.annotate(f"{name}: out of memory\nat {tokens_label(ooms[0])} tokens", (ooms[0], marker_y),
                            xycoords=on_top, xytext=(-10, -4), textcoords="offset points", ha="right", va="top",
                            fontsize=9, color=color, fontweight="bold")
            if ax is axes[0]:
                if line is None:  # a system that only ran out of memory still gets a legend entry
                    line = Line2D([], [], ls=ls, marker=marker, color=color, lw=2, label=label)
                handles.append(line)
        if key == "peak_alloc_beyond_weights":
            cap = next((r for r in rows if r.get("device_memory_bytes") and r.get("weights_bytes")), None)
            if cap is not None:
                free = (cap["device_memory_bytes"] - cap["weights_bytes"]) * scale
                ax.axhline(free, color="gray", ls="-.", lw=1)
                ax.annotate("device memory minus weights", (lengths[0], free), xytext=(2, 3),
                            textcoords="offset points", fontsize=8, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlim(lengths[0] / 1.3, lengths[-1] * 1.3)  # room for markers at the ends
        ax.set_xticks(lengths, [tokens_label(n) for n in lengths])
        ax.minorticks_off()
        positive = [v for v in values if v > 0]
        log = bool(positive) and max(positive) / min(positive) >= LOG_SPAN
        ax.set_yscale("log" if log else "linear")
        if log:
            ylabel += ", log scale"
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0)
            ax.set_ylim(top=ax.get_ylim()[1] * 1.18)  # room for the out-of-memory markers
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{TITLES[key]}: {better} is better", fontsize=11,
                     color="tab:green" if better == "higher" else "tab:purple")
        ax.grid(True, alpha=0.3)
    if any_reserved:
        handles.append(Line2D([], [], ls=":", color="black", lw=1.2, label="peak reserved by the allocator (memory panel)"))
    if any(r.get("oom") for r in rows):
        handles.append(Line2D([], [], ls="none", marker="X", ms=12, color="gray", markeredgecolor="black",
                              label="out of memory (first length where the system failed)"))
    first = rows[0]
    title = f"{first.get('shape', '')}, {first.get('dtype', '')}, batch 1, on {first.get('device', '')}"
    versions = f"torch {first.get('torch', '?')}, transformers {first.get('transformers', '?')}"
    fig.suptitle(f"stock transformers vs chunkinfer: {title}\n{versions}", fontsize=12)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
