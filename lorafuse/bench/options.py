"""Options of the per-layer benchmark (``python -m benchmarks.run`` / ``lorafuse bench``).

Kept apart from ``run.py`` and without torch, so ``lorafuse bench --help`` answers at once and bad
options are refused before torch is imported. Results go to ``./lorafuse-bench/`` under the current
directory unless ``--csv`` / ``--plot-dir`` say otherwise; the committed results are appended only
when asked (``--csv benchmarks/results/results.csv``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# every implementation of one patched linear, in the order of the tables (defined in providers.py)
PROVIDERS = (
    "F.linear",
    "peft_eager",
    "torch_seq",
    "klora_official",
    "lorafuse_static",
    "lorafuse_kl",
    "merged_scratch",
    "merged_flip",
)
DEFAULT_DIR = Path("lorafuse-bench")  # relative to the current directory
COMMITTED_CSV = "benchmarks/results/results.csv"

DESCRIPTION = """\
Per-layer forward benchmark of one patched linear: every provider (F.linear, PEFT eager, the lorafuse
kernels, merged weights) on the SDXL and FLUX attention and MLP shapes, timed in one process so every
ratio compares numbers of the same run, with p20-p80 spreads, measured peaks and a roofline.

Rows are appended to ./lorafuse-bench/results.csv (under the current directory) unless --csv names
another file; `--csv benchmarks/results/results.csv` appends to the repository's committed results.
Providers and columns: benchmarks/README.md."""


def build_parser(prog: str = "python -m benchmarks.run", parser_class=argparse.ArgumentParser,
                 parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's options, on a new parser or added to ``parser`` (``lorafuse bench``)."""
    p = parser or parser_class(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="two shapes, ranks 8 and 64 (CPU: 8), fewer rounds")
    p.add_argument("--plot", action="store_true", help="write PNG bar charts per shape (matplotlib)")
    p.add_argument("--plot-dir", type=Path, default=None,
                   help=f"folder for --plot (default ./{DEFAULT_DIR}/plots)")
    p.add_argument("--csv", type=Path, default=None,
                   help=f"CSV to append rows to (default ./{DEFAULT_DIR}/results.csv; the committed results: "
                        f"--csv {COMMITTED_CSV})")
    p.add_argument("--no-csv", action="store_true", help="print only")
    p.add_argument("--shapes", default=None, help="comma-separated MxKxN (replaces the SDXL/FLUX shapes, no CPU scaling)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default 4,8,16,64; --quick 8,64)")
    p.add_argument("--dtypes", default=None, help="e.g. float16,bfloat16 (default: fp16+bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gates", default=None, help="both (linear-merge gates, default) and/or onehot (K-LoRA/EST)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of: " + ", ".join(PROVIDERS) + " (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="CPU: interleaved rounds (default 5, --quick 3, issue case x3)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="backend of the lorafuse providers (default auto)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no new case after this (the cases left are listed; plots cover what ran)")
    p.add_argument("--probe-copy-mb", type=int, default=None, help=argparse.SUPPRESS)  # smoke test: small probes
    p.add_argument("--probe-gemm-n", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the default output paths (under the current directory)."""
    if args.csv is None:
        args.csv = DEFAULT_DIR / "results.csv"
    if args.plot_dir is None:
        args.plot_dir = DEFAULT_DIR / "plots"
    return args
