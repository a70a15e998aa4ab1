"""Command line: ``lorafuse demo | bench`` (also ``python -m lorafuse``)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _bench(argv: list[str]) -> int:
    """Forward to ``benchmarks.run.main``: benchmarks/ is a top-level folder of the repository checkout,
    not part of the installed package, so it is imported lazily (from the checkout this file sits in
    when the current directory is elsewhere)."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "benchmarks" / "run.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from benchmarks.run import main as bench_main
    except ImportError as err:
        print(
            "lorafuse bench: the benchmarks are not installed with the package; run it from a checkout of "
            f"the lorafuse repository (`pip install -e .` there, or `python -m benchmarks.run`). ({err})",
            file=sys.stderr,
        )
        return 2
    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafuse", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the fused kernel on a random layer: error vs reference, time per backend")
    demo.add_argument("--tiny", action="store_true", help="smallest shapes (CI)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.set_defaults(func=_demo)
    # options after `bench` go to benchmarks.run unparsed (see main); listed here for --help
    sub.add_parser("bench", add_help=False, help="per-layer benchmark of every provider (python -m benchmarks.run; "
                   "`lorafuse bench --help` for its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:  # `python -m lorafuse` with no arguments runs the demo
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
