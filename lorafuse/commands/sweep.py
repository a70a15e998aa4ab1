"""``lorafuse sweep SPEC``: every (LoRA pair, prompt, method, seed) of a SPEC file, scored and summarised.

    lorafuse sweep spec.yaml [--out DIR]                                     # one process
    torchrun --nproc_per_node 8 -m lorafuse sweep spec.yaml                  # one GPU each
    accelerate launch --num_processes 8 -m lorafuse sweep spec.yaml          # the same through accelerate

The SPEC is checked completely before anything is loaded: a bad one prints one line naming the key
and exits with 2. A rerun with the same SPEC and output folder skips the finished items. Exit codes:
0 done, 1 some items failed (listed in summary.md), 2 bad SPEC or output folder.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ._common import add_command

    p = add_command(subparsers, "sweep", "evaluate fusion methods over LoRA pairs x prompts x seeds from a SPEC "
                    "file (YAML/JSON); resumable, runs under torchrun / accelerate launch", __doc__, main)
    p.add_argument("spec", metavar="SPEC", nargs="?", help="YAML or JSON file (schema: README, 'lorafuse sweep')")
    p.add_argument("--out", default=None, help="output folder (default: the SPEC's output, else <SPEC stem>-sweep "
                   "beside it)")
    p.add_argument("--score-every", type=int, default=0, metavar="N",
                   help="score on the fly every N generated items (default 0: score after generation)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--check", action="store_true", help="check the SPEC and list the items; load nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--write-example", metavar="DIR", default=None,
                   help="write README's example SPEC with the LoRA files and reference images it names into DIR "
                   "(embedded tiny pipeline, offline) and exit")
    return p


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..sweep.items import claim_output, make_items
    from ..sweep.spec import SpecError, load_spec

    if args.write_example:
        from ..sweep.example import write_example

        path = write_example(args.write_example)
        print(f"lorafuse sweep: wrote {path} and the files it names; run it with: lorafuse sweep {path}")
        return 0
    if not args.spec:
        print("lorafuse sweep: SPEC: missing (a YAML or JSON file; --write-example DIR writes one)", file=sys.stderr)
        return 2
    try:
        spec = load_spec(args.spec)
        out = Path(args.out) if args.out else Path(spec.output)
        items = make_items(spec)
        if args.check:
            print(f"lorafuse sweep: {args.spec}: OK, {len(items)} items; output {out}")
            for it in items:
                print(f"  {it.key}")
            return 0
        if args.score_every < 0:
            raise SpecError(f"--score-every: must be >= 0, got {args.score_every}")
        claim_output(spec, out)
    except SpecError as e:
        if _is_main():
            print(f"lorafuse sweep: {args.spec}: {e}", file=sys.stderr)
        return 2

    from ..sweep.runner import make_state, run_sweep

    state = make_state(cpu=args.cpu)
    try:
        result = run_sweep(spec, out, state, progress=not args.no_progress, score_every=args.score_every)
    finally:
        if state.use_distributed:
            state.destroy_process_group()
    if not state.is_main_process:
        return 0
    from ..sweep.summary import table_markdown

    print(table_markdown(result["table"]))
    for n in result["notes"]:
        print(f"note: {n}")
    for r in result["failures"]:
        print(f"failed: {r['key']}: {r.get('error')}", file=sys.stderr)
    print(f"lorafuse sweep: {sum(t['ok'] for t in result['table'])}/{len(items)} items done, "
          f"{len(result['failures'])} failed; summary in {out / 'summary.md'}")
    return 1 if result["failures"] or result["missing"] else 0
