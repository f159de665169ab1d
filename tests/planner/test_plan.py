"""chunkinfer.planner.plan: memory and time predictions against the H200 measurements, placement, errors, CLI."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from chunkinfer import Plan, plan
from chunkinfer.planner.rates import (H200_ATTENTION_FLOPS, H200_DECODE_BYTES_PER_S, H200_DECODE_STEP_MS,
                                      H200_LINEAR_FLOPS, fit_decode_rates, fit_prefill_rates)
from chunkinfer.planner.shape import Shape
from chunkinfer.planner.units import parse_memory

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
GiB = 1 << 30


def llama8b():
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def read_rows(name: str) -> list[dict]:
    """The JSON rows of bench/results/<name>."""
    lines = (RESULTS / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def rows(what: str) -> list[dict]:
    return [r for r in read_rows("model_h200.jsonl") if r["what"] == what and r["error"] is None]


def current_decode_rows() -> list[dict]:
    # the decode step changes from build to build (the eager loop of Run 0, then CUDA graphs, fused
    # ops, gemv): the newest run's rows (the file is appended in time order) are the current code's
    decode = rows("chunkinfer decode")
    newest = (decode[-1]["command"], decode[-1].get("session"))
    return [r for r in decode if (r["command"], r.get("session")) == newest]


def H200(seq, **kw) -> Plan:
    kw.setdefault("device_memory", "139GiB")
    kw.setdefault("host_memory", "120GiB")
    return plan(llama8b(), seq, **kw)


# ---- (a) memory -------------------------------------------------------------------------------------------
def test_weights_match_measured():
    weights = rows("weights")[0]["peak_alloc_beyond_weights"]  # the weights row stores the weights' bytes
    assert abs(H200(32768).device_breakdown["weights"] - weights) / weights < 0.001


@pytest.mark.parametrize("row", rows("chunkinfer prefill"), ids=lambda r: f"{r['length']}")
def test_peak_alloc_within_10_percent(row):
    p = H200(row["length"], chunk_size=8192)  # the benchmark ran convert()'s CUDA default chunk
    measured = row["peak_alloc_beyond_weights"]
    assert abs(p.peak_alloc_beyond_weights - measured) / measured <= 0.10, (p.peak_alloc_beyond_weights, measured)
    # and what the plan budgets on the device (everything but the CUDA context) covers what was reserved
    assert p.device_bytes - p.device_breakdown["weights"] >= row["peak_reserved_beyond_weights"]


def test_measured_rows_present():
    assert len(rows("chunkinfer prefill")) >= 4 and len(current_decode_rows()) >= 3


# ---- (b) time ---------------------------------------------------------------------------------------------
def test_constants_are_the_fit_of_the_measurements():
    shape = Shape.from_config(llama8b())
    lin, att = fit_prefill_rates(shape, [(r["length"], r["seconds"]) for r in rows("chunkinfer prefill")])
    bw, step = fit_decode_rates(shape, [(r["length"], r["ms_per_token"]) for r in current_decode_rows()])
    assert lin == pytest.approx(H200_LINEAR_FLOPS, rel=2e-3)
    assert att == pytest.approx(H200_ATTENTION_FLOPS, rel=2e-3)
    assert bw == pytest.approx(H200_DECODE_BYTES_PER_S, rel=2e-3)
    assert step == pytest.approx(H200_DECODE_STEP_MS, rel=2e-3)


def test_prefill_seconds_within_20_percent():
    by_len: dict[int, list[float]] = {}
    for r in rows("chunkinfer prefill"):
        by_len.setdefault(r["length"], []).append(r["seconds"])
    for length, secs in by_len.items():
        pred = H200(length).prefill_seconds
        # the median of each length's measurements within 20%
        assert abs(pred - statistics.median(secs)) / statistics.median(secs) <= 0.20, (length, pred, secs)
        # every single row within 25%: model_h200.md (Run 2) documents single 32k prefills varying
        # 0.74x-1.09x between runs (one measured 1.91 s, its repeats 1.33 s)
        for s in secs:
            assert abs(pred - s) / s <= 0.25, (length, pred, s)
    # lengths >= 131072 (no run-to-run noise to speak of): every row within 20%
    for r in rows("chunkinfer prefill"):
        if r["length"] >= 131072:
            assert abs(H200(r["length"]).prefill_seconds - r["seconds"]) / r["seconds"] <= 0.20


@pytest.mark.parametrize("row", current_decode_rows(), ids=lambda r: f"{r['length']}")
def test_decode_ms_within_20_percent(row):
    pred = H200(row["length"]).decode_ms_per_token
    assert abs(pred - row["ms_per_token"]) / row["ms_per_token"] <= 0.20, (pred, row["ms_per_token"])


# ---- (c) placement ----------------------------------------------------------------------------------------
def test_4m_tokens_do_not_fit_and_the_reason_names_bytes():
    p = H200(4_194_304, allow_offload=False)
    assert not p.fits and p.chunk_size is None
    assert f"needs {p.device_bytes:,} bytes" in p.reason and f"{139 * GiB:,} bytes" in p.reason, p.reason
    assert "fits: no" in p.table() and "GiB" in p.table()
    # offloaded, the device would hold a few layers, but the host cannot take the rest (512 GiB of KV)
    q = H200(4_194_304)
    assert not q.fits and q.host_layers
    assert f"needs {q.host_bytes:,} bytes" in q.reason and f"{int(120 * GiB * 0.9):,} bytes" in q.reason, q.reason


def test_1m_on_80gib_needs_offload():
    p = plan(llama8b(), 1_048_576, device_memory="80GiB", host_memory="120GiB", allow_offload=False)
    assert not p.fits and p.host_layers == [] and len(p.resident_layers) == 32
    assert f"{80 * GiB:,}" in p.reason and "allow_offload" in p.reason and "it fits" in p.reason
    assert p.offload_available

    q = plan(llama8b(), 1_048_576, device_memory="80GiB", host_memory="120GiB")
    assert q.host_layers and q.resident_layers
    assert sorted(q.resident_layers + q.host_layers) == list(range(32))
    assert q.device_bytes <= 80 * GiB
    assert q.host_breakdown["KV on host"] == len(q.host_layers) * q.kv_capacity * 2 * 8 * 128 * 2
    assert q.fits and any("pinned host memory" in n for n in q.notes)
    # one more resident layer would not fit the device
    layer = q.host_breakdown["KV on host"] // len(q.host_layers)
    assert q.device_bytes + layer > 80 * GiB


def test_chunk_choice():
    assert H200(131072).chunk_size == 8192         # plenty of room: the cap
    assert H200(3000).chunk_size == 4096           # at most seq_len rounded up to a power of two
    assert H200(100).chunk_size == 1024            # the floor
    # a budget between what chunk 8192 and chunk 16384 need: 8192 is chosen
    c8 = H200(524288, chunk_size=8192).device_bytes
    c16 = H200(524288, chunk_size=16384).device_bytes
    assert c8 < c16
    mid = H200(524288, device_memory=(c8 + c16) // 2)
    assert mid.fits and mid.chunk_size == 8192 and mid.device_bytes <= (c8 + c16) // 2
    # below what the floor needs: does not fit, and says so
    c1 = H200(524288, chunk_size=1024).device_bytes
    tiny = H200(524288, device_memory=c1 - 1, allow_offload=False)
    assert not tiny.fits and tiny.chunk_size is None and "smallest chunk (1024)" in tiny.reason
    assert f"needs {c1:,} bytes" in tiny.reason and f"only {c1 - 1:,} bytes" in tiny.reason


def test_decode_tokens_grow_the_cache():
    p0, p = H200(131072), H200(131072, decode_tokens=4096)
    assert p.kv_capacity > p0.kv_capacity >= 131072 + 1024
    assert p.device_breakdown["KV resident"] > p0.device_breakdown["KV resident"]
    assert p.decode_seconds == pytest.approx(p.decode_ms_per_token * 4096 / 1e3)


def test_batch_scales():
    p1, p2 = H200(65536), H200(65536, batch=2)
    assert p2.device_breakdown["KV resident"] == 2 * p1.device_breakdown["KV resident"]
    assert p2.prefill_seconds == pytest.approx(2 * p1.prefill_seconds, rel=1e-3)


# ---- (d) every supported architecture -----------------------------------------------------------------------
def small_configs():
    T = transformers
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    return {
        "llama": T.LlamaConfig(**base),
        "mistral": T.MistralConfig(**base, sliding_window=256),
        "qwen2": T.Qwen2Config(**base),
        "qwen3": T.Qwen3Config(**base, head_dim=32),
        "phi3": T.Phi3Config(**base),
        "gemma3": T.Gemma3TextConfig(**{**base, "num_hidden_layers": 6}, head_dim=32, sliding_window=128),
    }


@pytest.mark.parametrize("name", list(small_configs()))
def test_every_architecture_plans(name, tmp_path):
    cfg = small_configs()[name]
    p = plan(cfg, 8192, device_memory="24GiB", host_memory="64GiB", dtype="float16")
    assert p.fits and p.chunk_size == 8192 and p.prefill_seconds > 0 and p.decode_ms_per_token > 0
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * cfg.num_key_value_heads * head_dim * 2
    # full-attention layers hold the capacity, sliding ones a ring of window - 1 (kv/ring.py)
    positions = sum(p.kv_capacity if w is None else min(8192, w - 1) for w in Shape.from_config(cfg).windows)
    assert p.device_breakdown["KV resident"] == per_position * positions
    # through a config.json too
    cfg.to_json_file(tmp_path / "config.json")
    q = plan(tmp_path / "config.json", 8192, device_memory="24GiB", host_memory="64GiB", dtype="float16")
    assert q.device_breakdown == p.device_breakdown
    assert plan(str(tmp_path), 8192, device_memory="24GiB", host_memory="64GiB", dtype="float16").fits


def test_sliding_windows_read_from_config():
    g = Shape.from_config(small_configs()["gemma3"])
    assert any(w == 128 for w in g.windows) and any(w is None for w in g.windows)
    assert all(w == 256 for w in Shape.from_config(small_configs()["mistral"]).windows)
    assert all(w is None for w in Shape.from_config(small_configs()["llama"]).windows)


# ---- (e) bad inputs -------------------------------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        H200(-5)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        H200(1.5)
    with pytest.raises(ValueError, match="cannot parse device_memory '12XB'"):
        H200(1024, device_memory="12XB")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        H200(1024, dtype="int3")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        H200(1024, batch=0)
    with pytest.raises(ValueError, match="decode_tokens"):
        H200(1024, decode_tokens=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        H200(1024, chunk_size=0)
    with pytest.raises(ValueError, match="host_memory must be > 0"):
        H200(1024, host_memory=0)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        plan(transformers.GPT2Config(), 1024, device_memory="80GiB", host_memory="80GiB")
    with pytest.raises(FileNotFoundError):
        plan("/nonexistent/config.json", 1024, device_memory="80GiB", host_memory="80GiB")


def test_parse_memory():
    assert parse_memory("139GiB") == 139 * GiB
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("120 gib") == 120 * GiB
    assert parse_memory("1.5TiB") == 3 * (1 << 39)
    assert parse_memory(4096) == 4096
    for bad in ("12XB", "", "GiB", "-3GiB", "1e9"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_default_device_memory_without_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="pass device_memory"):
        plan(llama8b(), 1024)


def test_table_format():
    t = H200(262144).table()
    assert "KV resident" in t and "32.12" in t and "fits: yes" in t and "ms/token" in t


# ---- (f) command line -------------------------------------------------------------------------------------------
def run_cli(*args):
    # the chunkinfer this interpreter imports (the installed one, with its compiled offload engine)
    return subprocess.run([sys.executable, "-m", "chunkinfer", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli(tmp_path):
    llama8b().to_json_file(tmp_path / "config.json")
    cfg = str(tmp_path / "config.json")
    ok = run_cli("plan", "--config", cfg, "--seq", "131072", "--gpu", "139GiB", "--host", "120GiB")
    assert ok.returncode == 0, ok.stderr
    assert "KV resident" in ok.stdout and "fits: yes" in ok.stdout and "16.12" in ok.stdout
    big = run_cli("plan", "--config", cfg, "--seq", "1572864", "--gpu", "139GiB", "--host", "120GiB")
    assert big.returncode == 0 and "fits: yes" in big.stdout and "on host" in big.stdout, big.stdout
    no = run_cli("plan", "--config", cfg, "--seq", "1572864", "--gpu", "139GiB", "--host", "120GiB", "--no-offload")
    assert no.returncode == 1 and "fits: no" in no.stdout and "bytes" in no.stdout


def test_cli_in_process(tmp_path, capsys):
    # the same entry point as the console script, without another interpreter start-up
    from chunkinfer.cli import main

    llama8b().to_json_file(tmp_path / "config.json")
    cfg = str(tmp_path / "config.json")
    assert main(["plan", "--config", cfg, "--seq", "1048576", "--gpu", "80GiB", "--host", "120GiB",
                 "--batch", "1", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "on host 21" in out and "pinned host memory" in out
    assert main(["plan", "--config", cfg, "--seq", "1048576", "--gpu", "80GiB", "--host", "120GiB",
                 "--no-offload"]) == 1
    out = capsys.readouterr().out
    # the command line's words, not plan()'s keyword names
    assert "(without --no-offload)" in out and "allow_offload" not in out, out
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "plan" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--gpu", "12XB"], "argument --gpu: cannot parse"),
    (["--gpu", "80"], "argument --gpu: '80' has no unit"),          # not 80 bytes
    (["--host", "120"], "argument --host: '120' has no unit"),
    (["--seq", "1.3k"], "argument --seq: '1.3k' is not a whole number"),
    (["--seq", "0"], "argument --seq: must be >= 1"),
    (["--seq", "lots"], "argument --seq: cannot parse"),
    (["--dtype", "int3"], "argument --dtype: unknown dtype 'int3'"),
    (["--batch", "0"], "argument --batch: must be >= 1"),
    (["--decode-tokens", "-1"], "argument --decode-tokens: must be >= 0"),
    (["--chunk-size", "0"], "argument --chunk-size: must be >= 1"),
])
def test_cli_refuses_bad_values_by_flag(tmp_path, capsys, args, message):
    from chunkinfer.cli import main

    llama8b().to_json_file(tmp_path / "config.json")
    base = {"--config": str(tmp_path / "config.json"), "--seq": "1024", "--gpu": "80GiB", "--host": "120GiB"}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as exc:
        main(["plan", *[x for kv in base.items() for x in kv]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "_" not in err.split("error:")[1].split("'")[0], err


def test_cli_without_gpu_or_cuda_names_the_flag(tmp_path, capsys, monkeypatch):
    from chunkinfer.cli import main

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    llama8b().to_json_file(tmp_path / "config.json")
    assert main(["plan", "--config", str(tmp_path / "config.json"), "--seq", "1024", "--host", "120GiB"]) == 2
    err = capsys.readouterr().err
    assert "--gpu is needed" in err and "device_memory" not in err, err


def test_cli_size_suffixes_longest_length_and_times_label(tmp_path, capsys):
    from chunkinfer.cli import main

    llama8b().to_json_file(tmp_path / "config.json")
    cfg = str(tmp_path / "config.json")
    assert main(["plan", "--config", cfg, "--seq", "1M", "--gpu", "80GiB", "--host", "120GiB"]) == 0
    out = capsys.readouterr().out
    assert "1,048,576 tokens" in out
    line = next(x for x in out.splitlines() if x.startswith("longest length that fits: "))
    longest = int(line.split(": ")[1].split(" tokens")[0].replace(",", ""))
    kw = dict(device_memory="80GiB", host_memory="120GiB")
    assert plan(llama8b(), longest, **kw).fits and not plan(llama8b(), longest + 1, **kw).fits
    assert "offloading KV to the host as needed" in line
    times = next(x for x in out.splitlines() if x.startswith("times: "))
    assert "H200" in times and "not scaled to --gpu 80 GiB" in times, times
    assert main(["plan", "--config", cfg, "--seq", "128k", "--gpu", "24GiB", "--host", "64GiB",
                 "--no-offload"]) in (0, 1)
    out = capsys.readouterr().out
    assert "131,072 tokens" in out and "every layer's KV on the GPU (--no-offload)" in out
    line = next(x for x in out.splitlines() if x.startswith("longest length that fits: "))
    longest = int(line.split(": ")[1].split(" tokens")[0].replace(",", ""))
    kw = dict(device_memory="24GiB", host_memory="64GiB", allow_offload=False)
    assert plan(llama8b(), longest, **kw).fits and not plan(llama8b(), longest + 1, **kw).fits


def test_flag_words():
    from chunkinfer.cli import flag_words

    assert flag_words("with KV offload (allow_offload=True) 21 of 32") == "with KV offload (without --no-offload) 21 of 32"
    assert flag_words("pass device_memory or host_memory; seq_len, decode_tokens, chunk_size") == \
        "pass --gpu or --host; --seq, --decode-tokens, --chunk-size"
    assert flag_words("device_memory_x stays") == "device_memory_x stays"


def test_longest_that_fits():
    from chunkinfer.planner.longest import longest_that_fits

    for limit in (1, 2, 7, 1000, 65536, 99991):
        calls = []
        assert longest_that_fits(lambda n: calls.append(n) or n <= limit) == limit
        assert len(calls) <= 2 * limit.bit_length() + 2
    assert longest_that_fits(lambda n: False) == 0
    assert longest_that_fits(lambda n: True, limit=1000) == 1000
    assert longest_that_fits(lambda n: n <= 700, limit=1000) == 700


def test_parse_count_and_units():
    from chunkinfer.planner.units import parse_count

    assert parse_count("131072") == 131072 and parse_count(4096) == 4096
    assert parse_count("128k") == 131072 and parse_count("128K") == 131072
    assert parse_count("1M") == 1048576 and parse_count("1.5M") == 1572864 and parse_count("1,048,576") == 1048576
    for bad in ("1.3k", "0", "-5", "1G", "k", "", "1e6"):
        with pytest.raises(ValueError):
            parse_count(bad)
    with pytest.raises(TypeError):
        parse_count(True)
    assert parse_memory("80GiB", require_unit=True) == 80 * GiB and parse_memory("80", "x") == 80
    with pytest.raises(ValueError, match="'80' has no unit"):
        parse_memory("80", "--gpu", require_unit=True)


# ---- (d) decode with every layer's KV on the host ---------------------------------------------------------
def host_decode_rows() -> list[tuple[int, bool, float]]:
    """(length, CPU attention on, measured ms): bench_offload (streaming only before the CPU split
    existed; with it, convert's default, since) and bench_host_decode's fixed-share / auto runs."""
    out = []
    for r in read_rows("offload_h200.jsonl"):
        if r["what"] == "chunkinfer all-streamed decode":
            # rows without the field predate the CPU split: streaming only
            out.append((r["length"], r.get("cpu_attention", False) is not False, r["ms_per_token"]))
    for r in read_rows("host_decode_h200.jsonl"):
        if r["what"] in ("decode, CPU share 0", "decode, CPU share auto"):
            out.append((r["length"], r["what"].endswith("auto"), r["ms_per_token"]))
    return out


@pytest.mark.parametrize("length,cpu_attention,ms", host_decode_rows(), ids=lambda v: str(v))
def test_all_host_decode_ms_within_20_percent(length, cpu_attention, ms):
    pred = H200(length, resident_layers=0, cpu_attention=cpu_attention).decode_ms_per_token
    assert abs(pred - ms) / ms <= 0.20, (pred, ms)


def test_host_decode_rows_cover_both_ways():
    kinds = {(cpu, length) for length, cpu, _ in host_decode_rows()}
    assert (False, 262144) in kinds and (True, 131072) in kinds and (True, 524288) in kinds


# ---- (e) the capacity run: 1,572,864 tokens, all 32 layers, on the H200 -----------------------------------
@pytest.mark.parametrize("row", read_rows("capacity_h200.jsonl"), ids=lambda r: f"{r['length']}-{r.get('cpu_attention', False)}")
def test_capacity_run_predicted(row):
    # the run's plan read the device (nvidia-smi: 143,771 MiB) and host (125 GiB); rows without the
    # cpu_attention field predate the CPU split and streamed every host layer
    p = H200(row["length"], chunk_size=8192, decode_tokens=16, cpu_attention=row.get("cpu_attention", False),
             device_memory="143771MiB", host_memory="125GiB")
    assert p.fits and len(p.resident_layers) == row["resident_layers"]
    measured = row["peak_alloc_beyond_weights"]
    assert abs(p.peak_alloc_beyond_weights - measured) / measured <= 0.10
    if row["length"] >= 131072:  # the 32k baseline row is one cold prefill and three decode steps
        assert abs(p.prefill_seconds - row["prefill_seconds"]) / row["prefill_seconds"] <= 0.20
        ms = row["decode_ms_median"]
        assert abs(p.decode_ms_per_token - ms) / ms <= 0.20, (p.decode_ms_per_token, ms)


def test_capacity_rows_include_the_current_code():
    assert any(r["length"] == 1572864 and r.get("cpu_attention") for r in read_rows("capacity_h200.jsonl"))
