"""bench/bench_prompt_lookup.py end to end on a short prompt: its four rows, the drafts counted from the
forwards, and its promise (chunkinfer's prompt lookup gives its greedy tokens) checked by its exit code."""
from __future__ import annotations

import json

import pytest

from bench import bench_prompt_lookup
from chunkinfer.tools.models import smollm2_gguf
from tests.e2e.real_models import require


@pytest.mark.slow
def test_rows_and_exit_code(tmp_path, capsys):
    require(smollm2_gguf)
    out = tmp_path / "rows.jsonl"
    code = bench_prompt_lookup.main(["--source-lines", "12", "--new-tokens", "16", "--drafts", "4", "--reps", "1",
                                     "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0
    assert [(r["system"], r["decoding"]) for r in rows] == [
        ("stock", "greedy"), ("stock", "prompt lookup"), ("chunkinfer", "greedy"), ("chunkinfer", "prompt lookup")]
    for r in rows:
        assert r["new_tokens"] == 16 and r["same_as_own_greedy"]
        if r["decoding"] == "greedy":
            assert r["forwards"] == 16 and r["accepted"] == r["drafted"] == 0
        else:  # each verification yields its accepted drafts and one token
            assert r["accepted"] + r["forwards"] == 16 and 0 <= r["accepted"] <= r["drafted"] <= 4 * (r["forwards"] - 1)
    assert "| chunkinfer | prompt lookup |" in capsys.readouterr().out
