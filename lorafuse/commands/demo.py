"""`lorafuse demo`: the main job on an embedded tiny pipeline, offline: about 30 s of wall time with
the defaults on an idle 2-core CPU (more on a busy one).

1. Build a small SD1.5-style pipeline with random weights (no downloads) and save it, as a diffusers
   folder, in OUT/pipeline: `lorafuse generate --model OUT/pipeline ...` runs on it.
2. Write a subject LoRA (rank 4) and a style LoRA (rank 16) as diffusers-format safetensors in
   OUT/loras and load them with `pipe.load_lora_weights(file, adapter_name=...)`, as a user would.
3. Check: run every fusion method through `lorafuse.accelerate_fusion` and replay its gate log
   through PEFT's own forward: the fused output must equal what PEFT computes for the same per-layer
   decisions (merge: PEFT with both adapters at weight 1). Heatmaps of the gates, the images and
   report.json go to OUT.
4. Time: ROUNDS interleaved rounds; each round runs, in a shifted order, PEFT eager with both
   adapters, the pipeline with LoRA disabled (the floor any LoRA method can reach), every method,
   and PEFT eager again (the repeat: how much two identical runs differ, the run's noise floor).
   Time per step = wall time of one denoiser call (hooks around the UNet; CUDA synchronised), all
   calls but each run's first; the table gives the median and the p20-p80 spread. The share of
   the CPU that other processes used meanwhile is measured (/proc/stat) and a warning printed when
   it disturbs the numbers.

On a CPU this shows host overhead per layer call (PEFT's extra ops, the methods' gate logic) and
that the results match PEFT; it cannot show the fused Triton kernels' speed, which needs a CUDA GPU
(`python -m benchmarks.gpu_check`, `lorafuse bench --device cuda`, `lorafuse demo --device cuda`, or
the committed GPU results under benchmarks/results/gpu/). The pipeline has random weights,
so the images are noise: they show that every method runs end to end, not what fusion looks like.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

from ..bench.load import cpu_ticks, other_cpu_share
from ._common import add_command, check_device_name, check_out_dir, check_positive, quiet_libraries, require, \
    resolve_device

METHODS = ("merge", "klora", "est", "kl")
SUBJECT, STYLE = "subject", "style"
PROMPT = "a photo of sks dog in watercolor style"
SUMMARY = ("every fusion method vs PEFT on an embedded tiny pipeline (time per step, difference vs PEFT, gates); "
           "writes ./lorafuse-demo/ with a pipeline and LoRA files for `generate`")
BUSY = 0.10  # share of the machine's CPU used by other processes above which the timing is called disturbed
CPU_NOTE = ("CPU run: it shows host overhead per layer call and that every method matches PEFT; it cannot show "
            "the fused Triton kernels' speed (CUDA only: python -m benchmarks.gpu_check or lorafuse bench --device cuda "
            "on a GPU, or the committed results in benchmarks/results/gpu/)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "demo", SUMMARY, __doc__, main)
    p.add_argument("--tiny", action="store_true", help="smallest pipeline, 3 steps, 1 timed round (CI)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 8, 3 with --tiny)")
    p.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (default 3, 1 with --tiny)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="methods to run (default: all four)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernel backend (default auto: Triton on CUDA, torch elsewhere)")
    p.add_argument("--out", default="lorafuse-demo", help="output folder (default ./lorafuse-demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def spread(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def write_loras(pipe, folder: Path, ranks=(4, 16)) -> tuple[Path, Path]:
    """Two random LoRAs on every attention projection of the UNet, diffusers/PEFT key format (call it
    before any LoRA is loaded into ``pipe``)."""
    from safetensors.torch import save_file

    from ..integrations.tiny import lora_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rank, seed, scale in ((SUBJECT, ranks[0], 1, 0.10), (STYLE, ranks[1], 2, 0.06)):
        path = folder / f"{name}.safetensors"
        save_file(lora_state_dict(pipe.unet, "unet", rank, seed=seed, scale=scale), str(path))
        paths.append(path)
    return paths[0], paths[1]


def gate_summary(log: list[dict]) -> dict:
    """Share of layer calls where the subject acts, overall and per denoiser call (per-sample gates
    count by their mean), and how many layers switch adapter at least once."""
    if not log:
        return {"subject_share": None, "subject_share_by_step": [], "layers_switching": 0}
    by_call: dict[int, list[float]] = {}
    by_layer: dict[int, set] = {}
    for e in log:
        g = e["subject"]
        g = sum(g) / len(g) if isinstance(g, list) else float(g)
        by_call.setdefault(e["call"], []).append(g)
        by_layer.setdefault(e["layer_index"], set()).add(round(g, 6))
    share = [sum(v) / len(v) for _, v in sorted(by_call.items())]
    every = [g for v in by_call.values() for g in v]
    return {
        "subject_share": sum(every) / len(every),
        "subject_share_by_step": [round(s, 4) for s in share],
        "layers_switching": sum(len(v) > 1 for v in by_layer.values()),
    }


def _summary_text(method: str, s: dict) -> str:
    if s["subject_share"] is None:
        return "-"
    if method == "merge":
        return "both adapters, weight 1 each"
    steps, n = s["subject_share_by_step"], s["layers_switching"]
    return (f"subject {100 * s['subject_share']:.0f}% of layer calls (step 1: {100 * steps[0]:.0f}%, "
            f"step {len(steps)}: {100 * steps[-1]:.0f}%), {n} layer{'' if n == 1 else 's'} switch{'es' if n == 1 else ''}")


def _save_image(pipe, latents, path: Path) -> None:
    import torch

    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    pipe.image_processor.postprocess(image.float(), output_type="pil")[0].save(path)


def run_demo(
    out: Path,
    *,
    tiny: bool = False,
    steps: int | None = None,
    rounds: int | None = None,
    methods=METHODS,
    device: str | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Run the demo and return the report (also written to ``out / "report.json"``)."""
    check_positive(steps, "--steps")
    check_positive(rounds, "--rounds")
    check_device_name(device)
    require("diffusers", "transformers", "peft")
    out = check_out_dir(out)
    dev = resolve_device(device)
    import torch

    from .. import accelerate_fusion
    from ..engine.gate_plot import plot_gate_log
    from ..integrations.replay import GateReplay
    from ..integrations.step_timer import StepTimer
    from ..integrations.tiny import sd15_pipeline

    quiet_libraries()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    size = "tiny" if tiny else "small"
    steps = (3 if tiny else 8) if steps is None else steps
    rounds = (1 if tiny else 3) if rounds is None else rounds
    methods = list(dict.fromkeys(methods))  # each method once, in the given order

    t_start = time.perf_counter()
    pipe = sd15_pipeline(size)
    pipe.save_pretrained(out / "pipeline")  # before any LoRA is loaded: a plain pipeline for `generate`
    subject_file, style_file = write_loras(pipe, out / "loras")
    pipe = pipe.to(dev, dtype)
    pipe.load_lora_weights(str(subject_file), adapter_name=SUBJECT)
    pipe.load_lora_weights(str(style_file), adapter_name=STYLE)
    pipe.set_adapters([SUBJECT, STYLE], [1.0, 1.0])

    def generate(desc: str) -> tuple:
        """(latents, seconds per steady denoiser call) of one run."""
        pipe.set_progress_bar_config(disable=not progress, desc=f"{desc:>16s}", leave=False)
        timer = StepTimer(pipe.unet, dev)
        try:
            with torch.no_grad():
                latents = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                               output_type="latent", generator=torch.Generator().manual_seed(0)).images
        finally:
            timer.remove()
        return latents, timer.steady()

    def run_variant(name: str, first: bool) -> tuple:
        """One run of a variant: PEFT eager ("peft", "peft_repeat"), LoRA disabled, or a method."""
        if name == "disabled":
            pipe.disable_lora()
            try:
                return generate("LoRA disabled") + (None,)
            finally:
                pipe.enable_lora()
        if name in ("peft", "peft_repeat"):
            return generate("PEFT eager") + (None,)
        handle = accelerate_fusion(pipe, SUBJECT, STYLE, method=name, backend=backend)  # defaults: gates logged
        try:
            latents, times = generate(f"lorafuse {name}")
            info = None
            if first:
                info = {"log": list(handle.gate_log), "layers": handle.num_layers, "names": list(handle.layer_names),
                        "fallbacks": dict(handle.fallbacks), "covered_by": handle.summary()["covered_by"]}
        finally:
            handle.remove()
        return latents, times, info

    # 1. one untimed run per variant (warm-up): the latents, gate logs and images
    variants = ["peft", "disabled", *methods, "peft_repeat"]
    first = {}
    for name in variants[:-1]:
        first[name] = run_variant(name, first=True)
    _save_image(pipe, first["peft"][0], out / "peft_eager.png")

    # 2. timed interleaved rounds, order shifted by one each round
    samples: dict[str, list[float]] = {v: [] for v in variants}
    ticks, load_before, t_timed = cpu_ticks(), _load(), time.perf_counter()
    for r in range(rounds):
        for name in variants[r % len(variants):] + variants[: r % len(variants)]:
            samples[name] += run_variant(name, first=False)[1]
    timed_seconds = time.perf_counter() - t_timed
    other = other_cpu_share(ticks, cpu_ticks(), timed_seconds)
    timing = {v: spread(s) for v, s in samples.items()}
    peft_step = timing["peft"][0]

    rows, layer_names = [], []
    for method in methods:
        latents, _, info = first[method]
        layer_names = layer_names or info["names"]
        heatmap = None
        if info["log"]:
            with contextlib.suppress(ImportError):  # matplotlib is optional (the "plot" extra)
                plot_gate_log(info["log"], out / f"gates_{method}.png", layer_names=info["names"],
                              title=f"lorafuse demo: {method}, subject gate per layer and step")
                heatmap = f"gates_{method}.png"
        if method == "merge":  # merge is exactly set_adapters([subject, style], [1, 1]): PEFT eager itself
            reference, ref_latents = "PEFT eager, both adapters", first["peft"][0]
        else:
            reference = "PEFT replay of the logged gates"
            replay = GateReplay(pipe, info["log"], names=(SUBJECT, STYLE))
            try:
                ref_latents, _ = generate(f"replay {method}")
            finally:
                replay.remove()
            if replay.misses:
                raise RuntimeError(f"lorafuse demo: {replay.misses} layer calls of {method} were not in its gate log")
        _save_image(pipe, latents, out / f"{method}.png")
        summary = gate_summary(info["log"])
        med, p20, p80 = timing[method]
        rows.append({
            "method": method,
            "ms_per_step": 1e3 * med, "p20_ms": 1e3 * p20, "p80_ms": 1e3 * p80,
            "speedup_vs_peft_eager": peft_step / med,
            "max_abs_diff": (latents.float() - ref_latents.float()).abs().max().item(),
            "reference": reference,
            "layers_fused": info["layers"],
            "covered_by": info["covered_by"],
            "fallback_calls": sum(info["fallbacks"].values()),
            "fallback_reasons": info["fallbacks"],
            "gates": _summary_text(method, summary),
            **summary,
            "image": f"{method}.png",
            "heatmap": heatmap,
        })

    import diffusers
    import peft
    import triton

    def ms(v: str) -> dict:
        med, p20, p80 = timing[v]
        return {"ms_per_step": 1e3 * med, "p20_ms": 1e3 * p20, "p80_ms": 1e3 * p80}

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "size": size,
        "steps": steps,
        "rounds": rounds,
        "timed_runs_per_variant": rounds,
        "samples_per_variant": len(samples["peft"]),
        "prompt": PROMPT,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "pipeline": str(out / "pipeline"),
        "loras": {SUBJECT: str(subject_file), STYLE: str(style_file)},
        "peft_eager": ms("peft"),
        "peft_eager_repeat": ms("peft_repeat"),
        "lora_disabled": ms("disabled"),
        "peft_eager_ms_per_step": 1e3 * peft_step,
        "noise_floor": abs(timing["peft_repeat"][0] / peft_step - 1.0),
        "other_cpu_share": other,
        "load_average": [load_before, _load()],
        "timing_disturbed": _disturbed(other, load_before),
        "layer_names": layer_names,
        "methods": rows,
        "seconds_total": time.perf_counter() - t_start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _disturbed(other: float | None, load: float | None) -> bool:
    if other is not None:
        return other > BUSY
    return load is not None and load > 0.5  # no /proc: the 1-minute load average before timing


def print_report(report: dict, out: Path) -> None:
    pe, rep, off = report["peft_eager"], report["peft_eager_repeat"], report["lora_disabled"]
    print(f"lorafuse demo: {report['size']} SD1.5-style pipeline (random weights), {report['steps']} steps, "
          f"{report['dtype']} on {report['device']}, backend {report['backend']}")
    print(f"time per denoiser step: median and p20-p80 of {report['samples_per_variant']} steps per row over "
          f"{report['rounds']} interleaved round{'s' if report['rounds'] != 1 else ''}")
    head = (f"{'':14s} {'ms/step':>8s} {'p20-p80 ms':>15s} {'vs PEFT':>8s} {'max|diff| vs ref':>17s} {'fused':>6s} "
            f"{'fallback':>9s}  gates")
    print(head)
    print("-" * len(head))

    def line(label: str, t: dict, rest: str = "") -> None:
        ratio = pe["ms_per_step"] / t["ms_per_step"]
        print(f"{label:14s} {t['ms_per_step']:8.1f} {t['p20_ms']:7.1f}-{t['p80_ms']:<7.1f} {ratio:7.2f}x{rest}")

    line("PEFT eager", pe, "  (the baseline: both adapters through PEFT)")
    line("PEFT (repeat)", rep, "  (the same run again: the noise floor)")
    line("LoRA disabled", off, "  (no LoRA at all: the floor for any method)")
    for r in report["methods"]:
        line(r["method"], r, f" {r['max_abs_diff']:17.2e} {r['layers_fused']:6d} {r['fallback_calls']:9d}  {r['gates']}")
    for r in report["methods"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in r["covered_by"].items())
        logged = "" if "PEFT's sum" in r["covered_by"] else " (every decision in the gate log)"
        print(f"{r['method']}: LoRA layers by what computes them: {kinds}{logged}")
    noise = report["noise_floor"]
    print(f"noise floor: two identical PEFT rows differ by {100 * noise:.0f}%; differences smaller than that, or "
          "inside overlapping p20-p80 spreads, are not measured differences")
    other = report["other_cpu_share"]
    if report["timing_disturbed"]:
        used = (f"other processes used {100 * other:.0f}% of the CPU" if other is not None else
                f"the load average was {report['load_average'][0]}")
        print(f"WARNING: {used} while timing: the times and ratios above are disturbed; rerun on an idle machine "
              "(on shared cores OMP_NUM_THREADS=1 keeps torch's threads from waiting for each other)")
    if report["device"].startswith("cpu"):
        print(CPU_NOTE)
    print("references: merge vs PEFT eager with both adapters; klora/est/kl vs PEFT replaying the logged gates. "
          "The pipeline has random weights, so the images are noise (they show that every method runs).")
    print(f"wrote {out}/: report.json, images, gate heatmaps, the pipeline ({out}/pipeline) and LoRA files "
          f"({out}/loras) in {report['seconds_total']:.0f} s; next:\n  lorafuse generate --model {out}/pipeline "
          f"--subject {out}/loras/subject.safetensors --style {out}/loras/style.safetensors --prompt \"{PROMPT}\"")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    report = run_demo(out, tiny=args.tiny, steps=args.steps, rounds=args.rounds, methods=args.methods or METHODS,
                      device=args.device, backend=args.backend, progress=not args.no_progress)
    print_report(report, out)
    return 0
