"""``lorafuse demo``: the main job on an embedded tiny pipeline, offline, in well under a minute on a CPU.

1. Build a small SD1.5-style pipeline with random weights (no downloads).
2. Write a subject LoRA (rank 4) and a style LoRA (rank 16) as diffusers-format safetensors and load
   them with ``pipe.load_lora_weights(file, adapter_name=...)``, as a user would.
3. Run PEFT eager with both adapters active (the baseline, and the merge method's reference), then
   each fusion method through :func:`lorafuse.accelerate_fusion`, and replay every fused run's gate
   log through PEFT's own forward (:class:`~lorafuse.integrations.replay.GateReplay`): the fused
   output must equal what PEFT computes for the same per-layer decisions.
4. Print a table (time per denoiser step vs PEFT eager, max |difference| vs the reference, layers
   fused / fallback calls, gate summary) and write the images, a gate heatmap per method and
   ``report.json`` into ``--out`` (default ``./lorafuse-demo/``).

Time per denoiser step is the median wall time of the denoiser's forward over a run's steps after
the first (hooks around the UNet call; CUDA is synchronised), the better of two identical runs
(one with ``--tiny``); the gate log and the images come from the last run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

METHODS = ("merge", "klora", "est", "kl")
SUBJECT, STYLE = "subject", "style"
PROMPT = "a photo of sks dog in watercolor style"


def _quiet_libraries() -> None:
    """diffusers/transformers log config deprecations and optional-dependency notes on every build."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # 2nd adapter: expected


class StepTimer:
    """Wall time of every forward of ``module`` (pre/post hooks), CUDA synchronised."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.times: list[float] = []
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._t0 = 0.0
        self._hooks = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def per_step(self) -> float:
        """Median seconds per denoiser call, the first (warm-up) call left out when there are more."""
        times = self.times[1:] if len(self.times) > 1 else self.times
        return statistics.median(times)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def write_loras(pipe, folder: Path, ranks=(4, 16)) -> tuple[Path, Path]:
    """Two random LoRAs on every attention projection of the UNet, diffusers/PEFT key format."""
    from safetensors.torch import save_file

    from .integrations.tiny import lora_state_dict

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
    steps = s["subject_share_by_step"]
    return (f"subject {100 * s['subject_share']:.0f}% of layer calls "
            f"(step 1: {100 * steps[0]:.0f}%, last: {100 * steps[-1]:.0f}%), {s['layers_switching']} layers switch")


def _save_image(pipe, latents: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    pipe.image_processor.postprocess(image.float(), output_type="pil")[0].save(path)


def run_demo(
    out: Path,
    *,
    tiny: bool = False,
    steps: int | None = None,
    methods=METHODS,
    device: str | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Run the demo and return the report (also written to ``out / "report.json"``)."""
    from . import accelerate_fusion
    from .integrations.replay import GateReplay
    from .integrations.tiny import sd15_pipeline

    _quiet_libraries()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lorafuse demo: --device cuda but no CUDA GPU is available")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    size = "tiny" if tiny else "small"
    steps = (3 if tiny else 10) if steps is None else steps
    if steps < 1:
        raise SystemExit(f"lorafuse demo: --steps must be at least 1, got {steps}")
    methods = list(dict.fromkeys(methods))  # each method once, in the given order
    timing_runs = 1 if tiny else 2
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    pipe = sd15_pipeline(size).to(dev, dtype)
    subject_file, style_file = write_loras(pipe, out / "loras")
    pipe.load_lora_weights(str(subject_file), adapter_name=SUBJECT)
    pipe.load_lora_weights(str(style_file), adapter_name=STYLE)
    pipe.set_adapters([SUBJECT, STYLE], [1.0, 1.0])

    def generate(desc: str, before_last_run=None, timing: bool = True) -> tuple[torch.Tensor, float]:
        """Latents of the run and its time per denoiser step: the best of ``timing_runs`` runs' medians
        (identical runs; ``before_last_run()`` is called before the last one, e.g. to clear a log)."""
        pipe.set_progress_bar_config(disable=not progress, desc=f"{desc:>14s}", leave=False)
        per_step = []
        runs = timing_runs if timing else 1
        for run in range(runs):
            if run == runs - 1 and before_last_run is not None:
                before_last_run()
            timer = StepTimer(pipe.unet, dev)
            try:
                with torch.no_grad():
                    latents = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
            finally:
                timer.remove()
            per_step.append(timer.per_step())
        return latents, min(per_step)

    peft_latents, peft_step = generate("PEFT eager")
    _save_image(pipe, peft_latents, out / "peft_eager.png")
    rows = []
    for method in methods:
        handle = accelerate_fusion(pipe, SUBJECT, STYLE, method=method, backend=backend)
        try:
            latents, step_time = generate(f"lorafuse {method}", before_last_run=handle.clear_gate_log)
            log = list(handle.gate_log)
            layers, fallbacks = handle.num_layers, dict(handle.fallbacks)
            heatmap = None
            with contextlib.suppress(ImportError):  # matplotlib is optional (the "plot" extra)
                handle.plot_gates(out / f"gates_{method}.png")
                heatmap = f"gates_{method}.png"
        finally:
            handle.remove()
        if method == "merge":  # merge is exactly set_adapters([subject, style], [1, 1]): PEFT eager itself
            reference, ref_latents = "PEFT eager, both adapters", peft_latents
        else:
            reference = "PEFT replay of the logged gates"
            replay = GateReplay(pipe, log, names=(SUBJECT, STYLE))
            try:
                ref_latents, _ = generate(f"replay {method}", timing=False)
            finally:
                replay.remove()
            if replay.misses:
                raise RuntimeError(f"lorafuse demo: {replay.misses} layer calls of {method} were not in its gate log")
        _save_image(pipe, latents, out / f"{method}.png")
        summary = gate_summary(log)
        rows.append({
            "method": method,
            "ms_per_step": 1e3 * step_time,
            "speedup_vs_peft_eager": peft_step / step_time,
            "max_abs_diff": (latents.float() - ref_latents.float()).abs().max().item(),
            "reference": reference,
            "layers_fused": layers,
            "fallback_calls": sum(fallbacks.values()),
            "fallback_reasons": fallbacks,
            "gates": _summary_text(method, summary),
            **summary,
            "image": f"{method}.png",
            "heatmap": heatmap,
        })

    import diffusers
    import peft
    import triton

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "size": size,
        "steps": steps,
        "prompt": PROMPT,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "loras": {SUBJECT: str(subject_file), STYLE: str(style_file)},
        "peft_eager_ms_per_step": 1e3 * peft_step,
        "methods": rows,
        "seconds_total": time.perf_counter() - t_start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict, out: Path) -> None:
    print(f"lorafuse demo: {report['size']} SD1.5-style pipeline, {report['steps']} steps, {report['dtype']} on "
          f"{report['device']}, backend {report['backend']}; PEFT eager {report['peft_eager_ms_per_step']:.1f} ms/step")
    head = f"{'method':7s} {'ms/step':>8s} {'vs PEFT':>8s} {'max|diff| vs ref':>17s} {'fused':>6s} {'fallback':>9s}  gates"
    print(head)
    print("-" * len(head))
    for r in report["methods"]:
        print(f"{r['method']:7s} {r['ms_per_step']:8.1f} {r['speedup_vs_peft_eager']:7.2f}x {r['max_abs_diff']:17.2e} "
              f"{r['layers_fused']:6d} {r['fallback_calls']:9d}  {r['gates']}")
    print(f"references: merge vs PEFT eager with both adapters; klora/est/kl vs PEFT replaying the logged gates. "
          f"Images, gate heatmaps and report.json in {out}/ ({report['seconds_total']:.0f} s)")


def main(args: argparse.Namespace | None = None) -> int:
    out = Path(getattr(args, "out", None) or "lorafuse-demo")
    methods = getattr(args, "methods", None) or METHODS
    report = run_demo(out, tiny=bool(getattr(args, "tiny", False)), steps=getattr(args, "steps", None),
                      methods=methods, device=getattr(args, "device", None),
                      backend=getattr(args, "backend", None) or "auto",
                      progress=not getattr(args, "no_progress", False))
    print_report(report, out)
    return 0
