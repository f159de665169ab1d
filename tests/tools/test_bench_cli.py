"""`chunkinfer bench` end to end on the CPU (tiny shape, fp32): JSON rows for every system and length, the
progress bar, the PNG; out of memory recorded and marked; bad input refused before any work."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkinfer import cli
from chunkinfer.kv import transfer
from chunkinfer.tools import plot as bench_plot, sweep as bench_sweep
from chunkinfer.tools.benchmark import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = [128, 512]


def expected_systems() -> list[str]:
    return ["stock", "chunkinfer"] + (["chunkinfer-offload"] if transfer.available() else [])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_measured(r: dict) -> None:
    assert r["error"] is None and not r["oom"] and r["skipped"] is None, r
    assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["length"] / r["seconds"])
    assert r["ms_per_token"] > 0 and r["decode_error"] is None
    assert r["weights_bytes"] > 0 and r["dtype"] == "float32" and r["shape"] == "tiny"
    assert r["torch"] == torch.__version__ and r["device"] and "bench" in r["command"]


@pytest.fixture
def one_thread():
    # 2 shared cores: OpenMP's spinning threads make tiny matmuls ~100x slower than one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_bench_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the chunkinfer this interpreter imports, as `python -m chunkinfer`
    env["PYTHONPATH"] = os.pathsep.join([str(Path(bench_sweep.__file__).parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "chunkinfer", "bench", "--shape", "tiny", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_bench_cli_end_to_end(tmp_path):
    png = tmp_path / "bench.png"
    proc = run_bench_cli("--device", "cpu", "--lengths", *map(str, LENGTHS), "--chunk-size", "128",
                         "--decode-steps", "2", "--out", str(png))
    rows = read_rows(tmp_path / "bench.jsonl")
    got = {(r["what"], r["length"]) for r in rows}
    assert got == {(s, n) for s in expected_systems() for n in LENGTHS}, got
    for r in rows:
        check_measured(r)
    assert "stock-offload: not run (needs CUDA)" in proc.stderr
    # the progress bar: stock counts layers (2), chunkinfer layers x chunks, each drawn to completion
    assert re.search(r"stock 512 tokens \[#+\] 2/2 layers", proc.stderr), proc.stderr
    done = re.search(r"chunkinfer 512 tokens \[#+\] (\d+)/(\d+) chunks", proc.stderr)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 2 * 512 // 128, proc.stderr
    if bench_plot.have_matplotlib():
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    else:
        assert "chunkinfer bench --plot" in proc.stdout and not png.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_bench_cli_cuda_every_system(tmp_path):
    proc = run_bench_cli("--device", "cuda", "--lengths", "1024", "4096", "--chunk-size", "1024",
                         "--decode-steps", "2", "--out", str(tmp_path / "bench.png"))
    rows = read_rows(tmp_path / "bench.jsonl")
    systems = ["stock", "chunkinfer", "stock-offload"] + (["chunkinfer-offload"] if transfer.available() else [])
    assert {(r["what"], r["length"]) for r in rows} == {(s, n) for s in systems for n in (1024, 4096)}, proc.stdout
    for r in rows:
        assert r["error"] is None and r["skipped"] is None, r
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["dtype"] == "bfloat16"
        # reserved peaks are measured from another baseline (what was reserved before): not ordered
        assert r["peak_alloc_beyond_weights"] > 0 and r["peak_reserved_beyond_weights"] >= 0
        assert r["device_memory_bytes"] == torch.cuda.get_device_properties(0).total_memory
    offload = [r for r in rows if r["what"] == "chunkinfer-offload"]
    assert all(r["host_pinned_bytes"] > 0 for r in offload)


def test_bench_records_oom_marks_it_and_skips_longer(tmp_path, monkeypatch, one_thread):
    """Stock's layers raise CUDA's out-of-memory error above 200 tokens (the real thing is a GPU run):
    the row says so, stock is not run at longer lengths, chunkinfer still is, and the plot renders."""
    def build_with_limit(config, device, dtype):
        model = build_model(config, device, dtype)

        def refuse(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] > 200:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

        for layer in model.get_decoder().layers:  # chunkinfer's loop calls the layers' parts, not forward
            layer.register_forward_pre_hook(refuse, with_kwargs=True)
        return model

    monkeypatch.setattr(bench_sweep, "build_model", build_with_limit)
    out = tmp_path / "rows.jsonl"
    settings = bench_sweep.BenchSettings(lengths=[128, 256, 512], systems=["stock", "chunkinfer"], shape="tiny",
                                         device="cpu", chunk_size=128, decode_steps=1, json_path=out,
                                         png_path=None, progress=False, command="chunkinfer bench (test)")
    rows = bench_sweep.run(settings)
    assert rows == read_rows(out)
    by = {(r["what"], r["length"]): r for r in rows}
    check_measured(by["stock", 128])
    assert by["stock", 256]["oom"] and "simulated" in by["stock", 256]["error"]
    assert by["stock", 512]["skipped"] == "skipped: out of memory at 256 tokens"
    for n in (128, 256, 512):
        check_measured(by["chunkinfer", n])
    if not bench_plot.have_matplotlib():
        pytest.skip("matplotlib is not installed: the PNG part needs it")
    png = tmp_path / "oom.png"
    assert cli.main(["bench", "--plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "--lengths must be integers >= 2"),
    (["--device", "cpu", "--systems", "stock-offload"], "'stock-offload' needs CUDA"),
    (["--device", "cpu", "--shape", "tiny", "--resident-layers", "3"], "--resident-layers must be in [0, 2]"),
    (["--device", "cpu", "--decode-steps", "0"], "--decode-steps must be >= 1"),
    (["--device", "cpu", "--config", "/nonexistent/config.json"], "config not found"),
    (["--plot", "/nonexistent/rows.jsonl"], "no rows file"),
])
def test_bench_bad_input_refused_before_work(argv, message, capsys, monkeypatch, tmp_path):
    def no_model(*_, **__):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(bench_sweep, "build_model", no_model)
    assert cli.main(["bench", *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "x.jsonl").exists()


def test_plot_rejects_a_file_that_is_not_bench_rows(tmp_path, capsys):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"foo": 1}\n')
    assert cli.main(["bench", "--plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a chunkinfer bench row" in capsys.readouterr().err
