"""lorafuse: fused subject + style LoRA fusion for diffusers pipelines, from the command line.

Start with `lorafuse demo` (offline: an embedded tiny pipeline with random weights), then try
`lorafuse generate --model lorafuse-demo/pipeline ...` on the pipeline and LoRA files it saved.
`lorafuse COMMAND --help` describes each command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules of lorafuse.commands, in the order --help lists them; each has add_parser(subparsers), main(args)
COMMANDS = ("demo", "generate", "inspect_lora", "kernel_demo", "sweep", "bench")


def build_parser() -> argparse.ArgumentParser:
    from .commands._common import HelpFormatter, Parser

    parser = Parser(prog="lorafuse", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lorafuse [COMMAND] [options]``: exit code 0, or 2 for a user error (one line on stderr)."""
    from .commands._common import UsageError, fail

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return args.main(args)
    except UsageError as exc:
        return fail(args.command, exc)
    except ModuleNotFoundError as exc:  # an optional dependency the command did not check for up front
        from .commands._common import EXTRA_OF

        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        return fail(args.command, UsageError(f'needs {top}, which is not installed: pip install "lorafuse[{EXTRA_OF[top]}]"'))


if __name__ == "__main__":
    sys.exit(main())
