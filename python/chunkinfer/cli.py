"""The ``chunkinfer`` command line. Subcommands: ``plan``, ``bench``."""
from __future__ import annotations

import argparse
import math
import re
import sys


# plan()'s keyword names as the command line spells them, for its messages
PLAN_FLAGS = {"allow_offload=True": "without --no-offload", "allow_offload": "--no-offload",
              "device_memory": "--gpu", "host_memory": "--host", "seq_len": "--seq",
              "decode_tokens": "--decode-tokens", "chunk_size": "--chunk-size",
              "kv_compression_ratio": "--kv-compression-ratio"}
_PLAN_FLAG_RE = re.compile("|".join(rf"\b{re.escape(k)}(?![\w=])" for k in PLAN_FLAGS))


def flag_words(text: str) -> str:
    """plan()'s Python names in ``text`` replaced by the flags that set them."""
    return _PLAN_FLAG_RE.sub(lambda m: PLAN_FLAGS[m.group(0)], text)


def _arg(parse, what: str):
    """An argparse type from a parser raising ValueError, its message naming the flag."""
    def convert(text: str):
        try:
            return parse(text, what)
        except (ValueError, TypeError) as exc:  # argparse names the flag already: "argument --gpu: ..."
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{what} ").removeprefix(f"{what}: ")) from None
    convert.__name__ = what
    return convert


def _size(text: str, what: str) -> int:
    from .planner.units import parse_memory

    return parse_memory(text, what, require_unit=True)


def _count(text: str, what: str) -> int:
    from .planner.units import parse_count

    return parse_count(text, what)


def _dtype(text: str, what: str) -> str:
    from .planner.units import parse_dtype

    try:
        parse_dtype(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return text


def _ratio(text: str, what: str) -> float:
    from .planner.plan import MIN_COMPRESSION_RATIO

    try:
        r = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number >= {MIN_COMPRESSION_RATIO}, got {text!r}") from None
    if not math.isfinite(r) or r < MIN_COMPRESSION_RATIO:
        raise ValueError(f"{what} must be a finite number >= {MIN_COMPRESSION_RATIO}, got {text!r}")
    return r


def _whole(minimum: int):
    def parse(text: str, what: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{what} must be a whole number, got {text!r}") from None
        if n < minimum:
            raise ValueError(f"{what} must be >= {minimum}, got {n}")
        return n
    return parse


def times_label(gpu_memory: int) -> str:
    """Which GPU plan()'s times belong to: the rates are an H200's, whatever --gpu says."""
    import torch

    from .planner.rates import RATES_FROM

    here = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if here is not None and "H200" in here:
        return f"times: an NVIDIA H200's, as this machine's GPU ({RATES_FROM})"
    local = f"this machine's {here}" if here else "this machine (no CUDA GPU)"
    return (f"times: an NVIDIA H200's ({RATES_FROM}), not scaled to --gpu {gpu_memory / (1 << 30):g} GiB or to "
            f"{local}: a slower GPU takes longer")


def _plan(args: argparse.Namespace) -> int:
    import torch

    from .planner.longest import longest_planned
    from .planner.plan import plan

    if args.gpu is None and not torch.cuda.is_available():
        raise ValueError("--gpu is needed: torch sees no CUDA GPU to read the memory size from (e.g. --gpu 80GiB)")
    kw = dict(batch=args.batch, dtype=args.dtype, device_memory=args.gpu, host_memory=args.host,
              decode_tokens=args.decode_tokens, chunk_size=args.chunk_size, allow_offload=not args.no_offload,
              kv_compression_ratio=args.kv_compression_ratio)
    p = plan(args.config, args.seq, **kw)
    print(flag_words(p.table()))
    longest = longest_planned(args.config, **kw)
    how = "every layer's KV on the GPU (--no-offload)" if args.no_offload else "offloading KV to the host as needed"
    if args.kv_compression_ratio is not None and not args.no_offload:
        how += f", host KV compressed at ratio {args.kv_compression_ratio:.2f}"
    print(f"longest length that fits: {longest:,} tokens (--gpu {p.device_memory / (1 << 30):.2f} GiB, --host "
          f"{p.host_memory / (1 << 30):.2f} GiB, {how})" if longest else
          "longest length that fits: none (not even one token)")
    print(times_label(p.device_memory))
    return 0 if p.fits else 1


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools import plot as bench_plot

    out = Path(args.out)
    if args.plot is not None:  # render saved rows only
        print(f"wrote {bench_plot.render(bench_plot.load_rows(args.plot), out)}")
        return 0
    from .tools.sweep import BenchSettings, run

    json_path = Path(args.json) if args.json else out.with_suffix(".jsonl")
    plotting = bench_plot.have_matplotlib()
    settings = BenchSettings(lengths=args.lengths, systems=args.systems, shape=args.shape, config=args.config,
                             device=args.device, dtype=args.dtype, chunk_size=args.chunk_size,
                             resident_layers=args.resident_layers, decode_steps=args.decode_steps,
                             max_seconds=args.max_seconds or None, json_path=json_path, png_path=out,
                             progress=not args.no_progress, command="chunkinfer " + " ".join(sys.argv[1:]))
    run(settings, render=(lambda rows: bench_plot.render(rows, out)) if plotting else None)
    print(f"wrote {json_path}")
    if plotting:
        print(f"wrote {out}")
    else:
        print(f"matplotlib is not installed, so no plot: {bench_plot.MATPLOTLIB_HINT}, then\n"
              f"  chunkinfer bench --plot {json_path} --out {out}")
    return 0


def _add_bench(sub) -> None:
    from .tools.sweep import SYSTEM_NAMES
    from .tools.benchmark import SHAPES

    b = sub.add_parser("bench", help="stock transformers vs chunkinfer over context lengths: JSON rows and a PNG",
                       description="Random-weight model from a config; per system and length: peak memory beyond "
                                   "the weights, prefill tokens/s, decode ms/token, out-of-memory recorded. Lengths "
                                   "run shortest first; writes JSON lines and a PNG plot (needs matplotlib).")
    what = b.add_mutually_exclusive_group()
    what.add_argument("--shape", choices=list(SHAPES), default=None,
                      help="built-in shape (default: llama-3.1-8b on CUDA, tiny on CPU)")
    what.add_argument("--config", default=None, help="a config.json or a model directory holding one")
    b.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="context lengths in tokens (default: 8192 32768 131072 524288 on CUDA, 1024 4096 16384 on CPU)")
    b.add_argument("--systems", nargs="+", choices=SYSTEM_NAMES, default=None,
                   help="default: all this machine can run (stock-offload needs CUDA)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    b.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    b.add_argument("--chunk-size", type=int, default=None, help="chunkinfer's chunk (default: convert()'s)")
    b.add_argument("--resident-layers", type=int, default=0,
                   help="chunkinfer-offload: leading layers whose KV stays on the device (default 0: all on the host)")
    b.add_argument("--decode-steps", type=int, default=5, help="timed decode steps per length (median reported)")
    b.add_argument("--max-seconds", type=float, default=540.0,
                   help="skip a run whose estimated end passes this many seconds from the start (0: no limit)")
    b.add_argument("--out", default="chunkinfer_bench.png", help="the PNG (default chunkinfer_bench.png)")
    b.add_argument("--json", default=None, help="the JSON lines (default: --out with .jsonl)")
    b.add_argument("--plot", default=None, metavar="ROWS.jsonl", help="only render saved rows to --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkinfer", description="chunkinfer: layer-chunked long-context inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plan", help="predict memory, chunk size and time of a long-context run",
                       description="Predict device/host memory, chunk size, prefill seconds and decode ms/token. "
                                   "Exit status 0 when it fits, 1 when it does not (the reason is printed).")
    p.add_argument("--config", required=True, help="a config.json or a model directory holding one")
    p.add_argument("--seq", required=True, type=_arg(_count, "--seq"),
                   help="prompt length in tokens: 131072, 128k (= 131,072) or 1M (= 1,048,576)")
    p.add_argument("--gpu", default=None, type=_arg(_size, "--gpu"),
                   help="device memory with its unit, e.g. 139GiB or 80GB (default: the CUDA device's total)")
    p.add_argument("--host", default=None, type=_arg(_size, "--host"),
                   help="host memory with its unit, e.g. 120GiB (default: physical memory)")
    p.add_argument("--batch", type=_arg(_whole(1), "--batch"), default=1)
    p.add_argument("--dtype", default="bfloat16", type=_arg(_dtype, "--dtype"), help="bfloat16 | float16 | float32")
    p.add_argument("--decode-tokens", type=_arg(_whole(0), "--decode-tokens"), default=0,
                   help="tokens to generate after the prompt")
    p.add_argument("--chunk-size", type=_arg(_whole(1), "--chunk-size"), default=None,
                   help="fix the chunk size instead of choosing it")
    p.add_argument("--no-offload", action="store_true",
                   help="every layer's KV on the device (default: offload layers to pinned host memory when needed)")
    p.add_argument("--kv-compression-ratio", type=_arg(_ratio, "--kv-compression-ratio"), default=None,
                   metavar="R",
                   help="plan host-offloaded KV stored with lossless compression at ratio R (raw / stored), already "
                        "margined (measured ratio / (1 + margin)); default: stored raw")
    p.set_defaults(func=_plan)
    _add_bench(sub)

    # chunkinfer demo: its arguments and command live in demo.py
    from .tools.demo import add_subcommand as add_demo

    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        message = flag_words(str(exc)) if args.command == "plan" else str(exc)
        print(f"chunkinfer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
