"""The ``chunkinfer`` command line. Subcommands: ``plan``."""
from __future__ import annotations

import argparse
import sys


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan

    p = plan(args.config, args.seq, batch=args.batch, dtype=args.dtype, device_memory=args.gpu,
             host_memory=args.host, decode_tokens=args.decode_tokens, chunk_size=args.chunk_size,
             allow_offload=not args.no_offload)
    print(p.table())
    return 0 if p.fits else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkinfer", description="chunkinfer: layer-chunked long-context inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plan", help="predict memory, chunk size and time of a long-context run",
                       description="Predict device/host memory, chunk size, prefill seconds and decode ms/token. "
                                   "Exit status 0 when it fits, 1 when it does not (the reason is printed).")
    p.add_argument("--config", required=True, help="a config.json or a model directory holding one")
    p.add_argument("--seq", required=True, type=int, help="prompt length in tokens")
    p.add_argument("--gpu", default=None, help="device memory, e.g. 139GiB or 80GB (default: the CUDA device's total)")
    p.add_argument("--host", default=None, help="host memory, e.g. 120GiB (default: physical memory)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    p.add_argument("--decode-tokens", type=int, default=0, help="tokens to generate after the prompt")
    p.add_argument("--chunk-size", type=int, default=None, help="fix the chunk size instead of choosing it")
    p.add_argument("--no-offload", action="store_true",
                   help="every layer's KV on the device (default: offload layers to pinned host memory when needed)")
    p.set_defaults(func=_plan)

    # chunkinfer demo: its arguments and command live in demo.py
    from .demo import add_subcommand as add_demo

    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"chunkinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
