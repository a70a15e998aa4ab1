"""Items per minute of ``lorafuse sweep``: one process vs two (``torchrun --nproc_per_node 2``) on this CPU.

    python -m benchmarks.sweep [--configs tiny,mid] [--seeds 2] [--steps 4] [--variants 1x2,2x1,1x1]
                               [--csv PATH] [--keep DIR]

Per config a SPEC of 2 subjects x 2 styles x 1 prompt x 2 methods (klora, kl) x ``--seeds`` seeds is
written with random LoRAs for the embedded pipeline, no scorers (generation only), backend "auto"
(torch on the CPU). Each variant runs the real command in a fresh output folder:

    1x2: one process, 2 torch threads      (python -m lorafuse sweep)
    2x1: two processes, 1 thread each      (torchrun --standalone --nproc_per_node 2 -m lorafuse sweep)
    1x1: one process, 1 thread             (the per-process baseline)

Reported: ``items_per_min`` = items / (last item finished - first item started, over all processes),
the generation phase; ``items_per_min_wall`` = items / the command's wall time (start-up, pipeline
builds, summary included); ``s_per_item`` = median seconds per item inside a process.

Configs (random init, fp32): tiny = the tests' SD1.5 UNet (32, 64) at 32x32 px; mid = the demo's UNet
(64, 128) at 64x64 px (the embedded 1-level VAE: latents as large as the image).

The machine is shared: the load average before and after each run and the busiest other processes at
the start are recorded. Rows go to ``benchmarks/results/sweep_cpu.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CSV_PATH = ROOT / "results" / "sweep_cpu.csv"
CONFIGS = {"tiny": ("lorafuse:tiny-sd15", "tiny", 32), "mid": ("lorafuse:small-sd15", "small", 64)}
VARIANTS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # processes x threads per process
FIELDS = ["date", "config", "variant", "processes", "threads_per_process", "items", "steps", "pixels",
          "items_per_min", "items_per_min_wall", "s_per_item", "gen_seconds", "wall_seconds", "load_before",
          "load_after", "others_at_start", "machine", "cpus", "torch", "diffusers", "git_commit"]


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout
        return sha.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def _others() -> str:
    """The busiest processes right now (not this one): what else ran."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and int(parts[1]) != os.getpid() and float(parts[0]) >= 5.0:
            rows.append(f"{parts[2]}:{parts[0]}%")
    return " ".join(rows[:6])


def write_spec(folder: Path, config: str, seeds: int, steps: int) -> Path:
    from lorafuse.sweep.example import write_loras_and_refs

    model, size, px = CONFIGS[config]
    write_loras_and_refs(folder, size=size)
    spec = {
        "model": model, "steps": steps, "height": px, "width": px, "guidance_scale": 7.5,
        "subjects": [{"name": n, "file": f"loras/{n}.safetensors", "trigger": f"sks {n}"} for n in ("dog", "cat")],
        "styles": [{"name": n, "file": f"loras/{n}.safetensors", "trigger": f"in {n} style"} for n in ("ink", "oil")],
        "prompts": ["a photo of {subject} {style}"], "methods": ["klora", "kl"], "seeds": seeds,
    }
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def run_variant(spec: Path, out: Path, processes: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)  # backend auto = torch on the CPU
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    cmd = head + ["-m", "lorafuse", "sweep", str(spec), "--out", str(out), "--no-progress", "--cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    recs = []
    for f in (out / "records").glob("*.jsonl"):
        recs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    ok = [r for r in recs if r["status"] == "ok"]
    gen = max(r["finished"] for r in ok) - min(r["started"] for r in ok)
    return {"items": len(ok), "gen_seconds": round(gen, 2), "wall_seconds": round(wall, 2),
            "items_per_min": round(60 * len(ok) / gen, 2), "items_per_min_wall": round(60 * len(ok) / wall, 2),
            "s_per_item": round(statistics.median(r["seconds"] for r in ok), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--variants", default="1x2,2x1,1x1")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--csv", default=str(CSV_PATH))
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--keep", default=None, help="keep the SPECs and outputs in this folder")
    args = ap.parse_args(argv)
    import diffusers
    import torch

    meta = {"machine": f"{platform.processor() or platform.machine()}", "cpus": os.cpu_count(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "git_commit": _git_commit()}
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorafuse-sweep-bench-"))
    rows = []
    print(f"{'config':6s} {'variant':7s} {'items':>5s} {'items/min':>9s} {'(wall)':>8s} {'s/item':>7s} "
          f"{'load before/after':>17s}  others at start")
    try:
        for config in args.configs.split(","):
            spec = write_spec(root / config, config, args.seeds, args.steps)
            for variant in args.variants.split(","):
                processes, threads = VARIANTS[variant]
                out = root / config / f"out-{variant}"
                shutil.rmtree(out, ignore_errors=True)
                others, load0 = _others(), os.getloadavg()[0]
                res = run_variant(spec, out, processes, threads)
                row = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "config": config,
                       "variant": variant, "processes": processes, "threads_per_process": threads,
                       "steps": args.steps, "pixels": CONFIGS[config][2], **res, "load_before": round(load0, 2),
                       "load_after": round(os.getloadavg()[0], 2), "others_at_start": others, **meta}
                rows.append(row)
                print(f"{config:6s} {variant:7s} {row['items']:5d} {row['items_per_min']:9.1f} "
                      f"{row['items_per_min_wall']:8.1f} {row['s_per_item']:7.2f} "
                      f"{row['load_before']:8.2f}/{row['load_after']:<8.2f}  {others}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
