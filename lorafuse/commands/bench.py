"""`lorafuse bench`: the per-layer benchmark of every provider (`python -m benchmarks.run`).

benchmarks/ is a top-level folder of the repository checkout, not part of the installed package: it
is found beside the installed package (an editable install) or in the current directory. Results go
to ./lorafuse-bench/ under the current directory unless --csv / --plot-dir say otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import UsageError, add_command, check_out_dir, require, resolve_device

SUMMARY = "per-layer benchmark of every provider (F.linear, PEFT, the kernels); writes ./lorafuse-bench/"


def _benchmarks_options():
    """The torch-free ``benchmarks.options`` module of a checkout, or None when there is none."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "benchmarks" / "options.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    try:
        from benchmarks import options
    except ImportError:
        return None
    return options


def add_parser(subparsers) -> argparse.ArgumentParser:
    options = _benchmarks_options()
    doc = options.DESCRIPTION if options is not None else __doc__
    p = add_command(subparsers, "bench", SUMMARY, doc, main)
    if options is not None:
        options.build_parser(parser=p)
    return p


def main(args: argparse.Namespace) -> int:
    options = _benchmarks_options()
    if options is None:
        raise UsageError("the benchmarks are not installed with the package; run it from a checkout of the lorafuse "
                         "repository (`pip install -e .` there, or `python -m benchmarks.run`)")
    options.resolve_paths(args)
    resolve_device(args.device)
    if not args.no_csv:
        check_out_dir(args.csv.parent, "--csv")
        if args.csv.is_dir():
            raise UsageError(f"--csv {str(args.csv)!r}: is a folder; give a .csv file path")
    if args.plot:
        require("matplotlib")
        check_out_dir(args.plot_dir, "--plot-dir")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    from benchmarks.run import run

    return run(args)
