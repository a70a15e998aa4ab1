"""`lorafuse bench`: the per-layer benchmark of every provider (:mod:`lorafuse.bench.run`; from a
checkout also `python -m benchmarks.run`). Results go to ./lorafuse-bench/ under the current
directory unless --csv / --plot-dir say otherwise.
"""

from __future__ import annotations

import argparse

from ..bench import options
from ._common import UsageError, add_command, check_out_dir, require, resolve_device

SUMMARY = "per-layer benchmark of every provider (F.linear, PEFT, the kernels); writes ./lorafuse-bench/"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "bench", SUMMARY, options.DESCRIPTION, main)
    options.build_parser(parser=p)
    return p


def main(args: argparse.Namespace) -> int:
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
    from ..bench.run import run  # imports torch: after the options are checked

    return run(args)
