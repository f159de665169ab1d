"""plan(kv_compression_ratio=...): host-resident KV stored with lossless compression (kv offload), its host
bytes, the host-fit verdict, decode time, the longest search and the ``chunkinfer plan`` flag."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import transformers

from chunkinfer import plan
from chunkinfer.planner.longest import longest_planned
from chunkinfer.planner.rates import H200_H2D_BYTES_PER_S, H200_SPLIT_CPU_BYTES_PER_S

GiB = 1 << 30
MEM = dict(device_memory="139GiB", host_memory="125GiB")
TOO_LONG_RAW = 2_097_152   # 2M tokens: 22 layers' raw KV (177 GiB) exceed 90% of a 125 GiB host


def llama8b() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def raw_layer_bytes(cfg: transformers.LlamaConfig, positions: int) -> int:
    """One layer's K and V in bf16, from the config alone (not from the planner's Shape)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_key_value_heads * head_dim * 2 * positions


def test_no_ratio_is_todays_plan():
    cfg = llama8b()
    base = plan(cfg, TOO_LONG_RAW, **MEM)
    assert plan(cfg, TOO_LONG_RAW, kv_compression_ratio=None, **MEM) == base
    assert base.kv_compression_ratio is None and "compress" not in base.table()
    # the host KV is the raw bytes, as before the option existed
    assert base.host_breakdown["KV on host"] == len(base.host_layers) * raw_layer_bytes(cfg, base.kv_capacity)
    # ratio 1.0: the same bytes and times; only the note and the field tell it apart
    one = plan(cfg, TOO_LONG_RAW, kv_compression_ratio=1, **MEM)
    assert one.host_breakdown == base.host_breakdown and one.device_breakdown == base.device_breakdown
    assert one.decode_ms_per_token == base.decode_ms_per_token and one.kv_compression_ratio == 1.0


def test_host_bytes_are_ceil_of_raw_over_ratio_per_layer():
    cfg, r = llama8b(), 1.25
    kw = dict(resident_layers=8, decode_tokens=64, **MEM)   # offload forced: 24 layers on the host
    raw = plan(cfg, 524_288, **kw)
    packed = plan(cfg, 524_288, kv_compression_ratio=r, **kw)
    assert len(packed.host_layers) == 24 and packed.kv_capacity == raw.kv_capacity
    layer = raw_layer_bytes(cfg, packed.kv_capacity)
    assert packed.host_breakdown["KV on host"] == 24 * math.ceil(Fraction(layer) / Fraction(r))
    assert packed.host_breakdown["pinned arena slab tail"] == GiB
    # the device is unchanged: its staging slots hold the expanded K, V
    assert packed.device_breakdown == raw.device_breakdown
    assert packed.kv_compression_ratio == r
    assert any("lossless compression at the planned ratio 1.25" in n for n in packed.notes), packed.notes
    assert "KV on host (compressed 1.25x)" in packed.table() and "host KV compressed, ratio 1.25" in packed.table()
    # decode: the streamed share crosses PCIe as bytes / r, i.e. raw bytes at r x H2D; the CPU share as before
    mean = 524_288 + 64 // 2
    host_raw = 24 * raw_layer_bytes(cfg, mean) * 1e3
    delta = host_raw / (H200_H2D_BYTES_PER_S + H200_SPLIT_CPU_BYTES_PER_S) - \
        host_raw / (r * H200_H2D_BYTES_PER_S + H200_SPLIT_CPU_BYTES_PER_S)
    assert raw.decode_ms_per_token - packed.decode_ms_per_token == pytest.approx(delta, rel=1e-9)


def test_a_length_too_long_for_the_host_raw_fits_compressed():
    cfg = llama8b()
    raw = plan(cfg, TOO_LONG_RAW, **MEM)
    assert not raw.fits and raw.chunk_size is not None and raw.host_layers
    assert raw.reason.startswith("host needs") and "125.00 GiB" in raw.reason, raw.reason
    packed = plan(cfg, TOO_LONG_RAW, kv_compression_ratio=2.0, **MEM)
    assert packed.fits and packed.host_layers == raw.host_layers, packed.reason
    assert packed.host_bytes <= int(125 * GiB * 0.9) < raw.host_bytes
    # not enough compression: the reason says the host KV was already compressed
    short = plan(cfg, TOO_LONG_RAW, kv_compression_ratio=1.2, **MEM)
    assert not short.fits and "compressed at ratio 1.20" in short.reason, short.reason
    # the no-offload failure asks plan() again with offload: the ratio goes with it
    assert "would not fit either" in plan(cfg, TOO_LONG_RAW, allow_offload=False, **MEM).reason
    assert "it fits" in plan(cfg, TOO_LONG_RAW, allow_offload=False, kv_compression_ratio=2.0, **MEM).reason


def test_longest_search_takes_the_ratio():
    cfg = llama8b()
    raw = longest_planned(cfg, **MEM)
    packed = longest_planned(cfg, kv_compression_ratio=2.0, **MEM)
    assert packed > raw
    assert plan(cfg, packed, kv_compression_ratio=2.0, **MEM).fits and not plan(cfg, packed, **MEM).fits
    assert not plan(cfg, packed + 1, kv_compression_ratio=2.0, **MEM).fits


@pytest.mark.parametrize("bad, error", [(0.4, ValueError), (0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("x", TypeError), (True, TypeError),
                                        ("1.5", TypeError)])
def test_bad_ratios_name_the_argument(bad, error):
    with pytest.raises(error, match="kv_compression_ratio"):
        plan(llama8b(), 4096, kv_compression_ratio=bad, **MEM)


def test_ratio_on_a_cpu_plan_is_refused():
    with pytest.raises(ValueError, match="kv_compression_ratio"):
        plan(llama8b(), 4096, device="cpu", device_memory="64GiB", process_baseline=0, kv_compression_ratio=2.0)


def test_cli_passes_the_ratio(tmp_path, capsys):
    from chunkinfer.cli import main

    llama8b().to_json_file(tmp_path / "config.json")
    args = ["plan", "--config", str(tmp_path / "config.json"), "--seq", "2M", "--gpu", "139GiB", "--host", "125GiB"]
    assert main(args) == 1
    assert "host needs" in capsys.readouterr().out
    assert main([*args, "--kv-compression-ratio", "2"]) == 0
    out = capsys.readouterr().out
    assert "KV on host (compressed 2.00x)" in out and "--kv-compression-ratio" in out, out
    line = next(x for x in out.splitlines() if x.startswith("longest length that fits: "))
    assert "host KV compressed at ratio 2.00" in line, line
    longest = int(line.split(": ")[1].split(" tokens")[0].replace(",", ""))
    assert longest == longest_planned(llama8b(), kv_compression_ratio=2.0, **MEM)
    with pytest.raises(SystemExit) as exc:
        main([*args, "--kv-compression-ratio", "0.4"])
    assert exc.value.code == 2
    assert "argument --kv-compression-ratio: must be a finite number >= 0.5" in capsys.readouterr().err


def test_layers_encoded_on_the_device_when_the_host_cannot_hold_the_rest():
    """2,097,152 tokens at ratio 1.29 (what real K, V reach, bench/results/kv_compression_cpu.md): the host
    takes only 17 layers encoded, so the others are kept encoded in device memory (raw-resident layers
    given up for them); each costs ceil(raw / r) there."""
    cfg, r, n = llama8b(), 1.29, 2_097_152
    p = plan(cfg, n, kv_compression_ratio=r, decode_tokens=16, **MEM)
    assert p.fits, p.reason
    assert p.encoded_device_layers and p.host_layers
    assert sorted(p.encoded_device_layers + p.host_layers + [i for i in p.resident_layers]) == list(range(32))
    assert p.encoded_device_layers == list(range(p.encoded_device_layers[0], p.host_layers[0]))
    layer = raw_layer_bytes(cfg, p.kv_capacity)
    assert p.device_breakdown["KV encoded on device"] == len(p.encoded_device_layers) * math.ceil(Fraction(layer) / Fraction(r))
    assert p.device_bytes <= 139 * GiB and p.host_bytes <= int(125 * GiB * 0.9)
    assert p.device_breakdown["KV offload staging"] == layer  # one slot where memory is what limits
    assert f"encoded on device {len(p.encoded_device_layers)}" in p.table()
    # without the device tier the host would need every non-resident layer: more than it has
    encoded = math.ceil(Fraction(layer) / Fraction(r))
    assert (32 - len(p.resident_layers)) * encoded + GiB > int(125 * GiB * 0.9)
    # where the host holds the rest, nothing is encoded on the device
    assert plan(cfg, 1_048_576, kv_compression_ratio=r, **MEM).encoded_device_layers == []
    # a ratio too low for the length: the reason reports the closest placement, every layer encoded
    short = plan(cfg, n, kv_compression_ratio=1.17, **MEM)
    assert not short.fits and "(the device holds 0 raw and " in short.reason, short.reason


def test_rings_inside_the_encoded_span_count_as_resident():
    """Gemma-3's sliding layers between the full ones stay raw rings on the device: the device part
    "KV encoded on device" is the full layers' encoded bytes only, and the rings stay in "KV resident"."""
    cfg = transformers.Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                        num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                        vocab_size=262208, sliding_window=1024)
    r = 1.3
    p = plan(cfg, 4_000_000, kv_compression_ratio=r, **MEM)
    assert p.encoded_device_layers and p.encoded_device_layers[-1] - p.encoded_device_layers[0] > 1  # rings between
    layer = 2 * 8 * 256 * 2 * p.kv_capacity
    encoded = len(p.encoded_device_layers) * math.ceil(Fraction(layer) / Fraction(r))
    assert p.device_breakdown["KV encoded on device"] == encoded
    assert p.device_breakdown["KV resident"] > 0  # the rings (and any raw-resident full layers)
