"""Command line: ``lorafuse demo | generate | inspect | bench | kernel`` (also ``python -m lorafuse``)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _kernel(args: argparse.Namespace) -> int:
    from .kernel_demo import main as kernel_main

    return kernel_main(args)


def _generate(args: argparse.Namespace) -> int:
    from .generate import main as generate_main

    return generate_main(args)


def _inspect(args: argparse.Namespace) -> int:
    from .inspect_lora import main as inspect_main

    return inspect_main(args)


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
    demo = sub.add_parser("demo", help="the main job on an embedded tiny pipeline: every fusion method vs PEFT "
                          "(time per step, difference vs reference, gates); writes ./lorafuse-demo/")
    demo.add_argument("--tiny", action="store_true", help="smallest pipeline and 3 steps (CI)")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default 10, 3 with --tiny)")
    demo.add_argument("--methods", nargs="+", default=None, choices=("merge", "klora", "est", "kl"),
                      help="methods to run (default: all four)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="kernel backend")
    demo.add_argument("--out", default="lorafuse-demo", help="output folder (default ./lorafuse-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="fuse two LoRA files into a local diffusers model and generate an image")
    gen.add_argument("--model", required=True, help="local diffusers pipeline folder (model_index.json)")
    gen.add_argument("--subject", required=True, help="subject LoRA safetensors file")
    gen.add_argument("--style", required=True, help="style LoRA safetensors file")
    gen.add_argument("--method", default="klora", help="klora | est | kl | merge | subject | style (default klora)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                     help="default: float16 on CUDA, float32 on CPU")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    gen.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="method option, e.g. --option pattern=s --option D=0.4 (repeatable)")
    gen.add_argument("--out", default="lorafuse-out", help="output folder (default ./lorafuse-out)")
    gen.set_defaults(func=_generate)

    ins = sub.add_parser("inspect", help="format, layers, ranks and alphas of LoRA files; with two files the "
                         "K-LoRA/EST statistics and flip steps per layer")
    ins.add_argument("files", nargs="+", metavar="FILE", help="one or two LoRA safetensors files (subject, style)")
    ins.add_argument("--steps", type=int, default=50, help="step count for the flip table (default 50)")
    ins.add_argument("--family", default=None, choices=("sd", "sdxl", "sd3", "flux"),
                     help="model family (default: guessed from the keys)")
    ins.add_argument("--model", default=None, help="local diffusers folder: checks the layers against its denoiser "
                     "(and gives SDXL kohya files the UNet config they need)")
    ins.add_argument("--layers", type=int, default=40, help="print at most this many layers (default 40; 0: all)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ins.set_defaults(func=_inspect)

    kernel = sub.add_parser("kernel", help="the fused kernel on one random layer: error vs fp64, time per backend")
    kernel.add_argument("--tiny", action="store_true", help="smallest shapes (CI)")
    kernel.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    kernel.set_defaults(func=_kernel)
    from .commands import sweep
    sweep.add_parser(sub)
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
