"""Extra time per guided step relative to an unguided step (metric-guided latent refinement).

    python -m benchmarks.guidance [--configs tiny,mid] [--modes vae,denoiser] [--steps 6] [--rounds 5]
                                  [--threads N] [--csv PATH]

Both runs use the same pipeline with two LoRAs fused by ``accelerate_fusion(..., method="kl")``;
the guided runs add ``guidance=GuidanceConfig(...)`` guiding every step with a DINO-like subject
scorer (2 reference images) and a CLIP-like style scorer (1 reference), random-init (no weights).
A step is timed as the wall-clock interval between consecutive ``callback_on_step_end`` calls
(denoiser + guidance + scheduler step; the first step, text encoding and the run's set-up are left
out). Rounds interleave the variants (unguided, then each guided mode) and the medians are reported;
``ratio`` = guided / unguided step time, ``extra_ms`` = the difference.

Configs (CPU, random init, fp32):
  tiny: the tests' SD1.5 UNet (32, 64), 1-level VAE (8 ch), 32x32 px (latent 32x32), scorers 32 px,
        width 32, 2 layers.
  mid:  the demo's UNet (64, 128), 2-level VAE (32, 64 ch), 128x128 px (latent 64x64), scorers 64 px,
        width 128, 4 layers.

Rows are appended to ``benchmarks/results/guidance_cpu.csv`` with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.run import device_name, git_commit

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CSV_PATH = RESULTS / "guidance_cpu.csv"
CSV_FIELDS = [
    "date", "config", "mode", "height", "width", "latent", "steps", "rounds", "unguided_ms", "guided_ms",
    "extra_ms", "ratio", "unguided_p20_ms", "unguided_p80_ms", "guided_p20_ms", "guided_p80_ms", "torch_threads",
    "load_avg", "machine", "python", "torch", "diffusers", "transformers", "peft", "git_commit",
]
CONFIGS = {
    # name: (sd15 size, VAE block_out_channels, pixels, scorer (image_size, hidden, layers))
    "tiny": ("tiny", (8,), 32, (32, 32, 2)),
    "mid": ("small", (32, 64), 128, (64, 128, 4)),
}


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "none"


def build(config: str):
    """(pipeline with "sbj"/"sty" loaded, GuidanceConfig factory, pixels) for a config name."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from lorafuse.guidance import CLIPScorer, DINOScorer, GuidanceConfig
    from lorafuse.integrations import tiny

    size, vae_blocks, px, (s_px, s_w, s_layers) = CONFIGS[config]
    pipe = tiny.sd15_pipeline(size=size)
    if tuple(vae_blocks) != (8,):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=list(vae_blocks), in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D"] * len(vae_blocks),
                            up_block_types=["UpDecoderBlock2D"] * len(vae_blocks), latent_channels=4,
                            norm_num_groups=8, layers_per_block=1)
        pipe = StableDiffusionPipeline(**{**pipe.components, "vae": vae}, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    d = pipe.unet
    loras = [(name, tiny.lora_state_dict(d, "unet", rank, seed=seed)) for name, rank, seed in (("sbj", 4, 1), ("sty", 8, 2))]
    for name, sd in loras:  # both dicts built before the first load (loaded targets are no longer nn.Linear)
        pipe.load_lora_weights(sd, adapter_name=name)
    g = torch.Generator().manual_seed(3)
    subj, sty = torch.rand(2, 3, px, px, generator=g), torch.rand(1, 3, px, px, generator=g)
    dino = DINOScorer.tiny(seed=1, image_size=s_px, hidden=s_w, layers=s_layers)
    clip = CLIPScorer.tiny(seed=2, image_size=s_px, hidden=s_w, layers=s_layers)

    def make(mode: str):
        return GuidanceConfig(subject_scorer=dino, subject_images=subj, style_scorer=clip, style_images=sty,
                              grad_through=mode)

    return pipe, make, px


def _step_times(pipe, px: int, steps: int) -> list[float]:
    stamps = []

    def cb(p, i, t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    with torch.no_grad():
        pipe(prompt="a photo of sks dog", num_inference_steps=steps, guidance_scale=6.0, height=px, width=px,
             output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=cb)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench(config: str, modes, steps: int, rounds: int) -> list[dict]:
    import lorafuse

    pipe, make, px = build(config)
    variants = [("unguided", None)] + [(m, make(m)) for m in modes]
    times = {name: [] for name, _ in variants}
    for r in range(rounds + 1):  # round 0 warms up every variant
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name, cfg in order:
            h = lorafuse.accelerate_fusion(pipe, "sbj", "sty", method="kl", guidance=cfg, log_gates=False)
            try:
                ts = _step_times(pipe, px, steps)
            finally:
                h.remove()
            if r:
                times[name].extend(ts)
    lat = px // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    base = statistics.median(times["unguided"])
    rows = []
    for name in modes:
        med = statistics.median(times[name])
        rows.append({
            "config": config, "mode": name, "height": px, "width": px, "latent": f"4x{lat}x{lat}", "steps": steps,
            "rounds": rounds, "unguided_ms": round(base * 1e3, 3), "guided_ms": round(med * 1e3, 3),
            "extra_ms": round((med - base) * 1e3, 3), "ratio": round(med / base, 3),
            "unguided_p20_ms": round(_q(times["unguided"], 0.2) * 1e3, 3),
            "unguided_p80_ms": round(_q(times["unguided"], 0.8) * 1e3, 3),
            "guided_p20_ms": round(_q(times[name], 0.2) * 1e3, 3), "guided_p80_ms": round(_q(times[name], 0.8) * 1e3, 3),
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.guidance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tiny,mid", help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--modes", default="vae,denoiser", help="guided modes (grad_through): vae,denoiser")
    ap.add_argument("--steps", type=int, default=6, help="sampler steps per run (steps-1 timed intervals)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--csv", default=str(CSV_PATH), help="CSV to append to")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}; valid: {', '.join(CONFIGS)}")
    for m in modes:
        if m not in ("vae", "denoiser"):
            ap.error(f"unknown mode {m!r}; valid: vae, denoiser")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step times are intervals between steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*peft_config.*")
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch_threads": torch.get_num_threads(), "machine": device_name(torch.device("cpu")), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": _version("diffusers"), "transformers": _version("transformers"),
        "peft": _version("peft"), "git_commit": git_commit(),
    }
    print(f"guidance benchmark: {meta['machine']}, torch {meta['torch']} ({meta['torch_threads']} threads), "
          f"diffusers {meta['diffusers']}, transformers {meta['transformers']}, {meta['date']}")
    print(f"{'config':<6} {'mode':<9} {'px':>4} {'latent':>9} {'unguided ms':>12} {'guided ms':>10} {'extra ms':>9} "
          f"{'ratio':>6}  load")
    rows = []
    for c in configs:
        for row in bench(c, modes, args.steps, args.rounds):
            row.update(meta, load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "")
            rows.append(row)
            print(f"{row['config']:<6} {row['mode']:<9} {row['height']:>4} {row['latent']:>9} {row['unguided_ms']:>12.1f} "
                  f"{row['guided_ms']:>10.1f} {row['extra_ms']:>9.1f} {row['ratio']:>6.2f}  {row['load_avg']}")
            sys.stdout.flush()
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    print(f"wrote {len(rows)} row(s) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
