"""Command line: ``lorafuse demo | bench`` (also ``python -m lorafuse``)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafuse", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the fused kernel on a random layer: error vs reference, time per backend")
    demo.add_argument("--tiny", action="store_true", help="smallest shapes (CI)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `python -m lorafuse` with no arguments runs the demo
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
