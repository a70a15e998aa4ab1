"""``lorafuse generate``: fuse a subject and a style LoRA file into a local diffusers model and generate.

    lorafuse generate --model ./sdxl-base --subject dog.safetensors --style watercolor.safetensors \\
        --method klora --prompt "a sks dog in watercolor style" --steps 30 --seed 0 --out out/

Loads the pipeline class named in the folder's ``model_index.json`` (``DiffusionPipeline``), checks
both LoRA files against its denoiser (:mod:`lorafuse.integrations.lora_files`: clear errors naming the
file and the key), loads them with ``pipe.load_lora_weights(..., adapter_name="subject" / "style")``,
installs :func:`lorafuse.accelerate_fusion` and writes ``image.png``, ``gates.png`` (the gate heatmap,
when matplotlib is installed) and ``run.json`` (arguments, versions, timings, gate summary) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class UsageError(ValueError):
    """A problem with the command's inputs (printed without a traceback)."""


def resolve_device(device: str | None) -> torch.device:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA was requested but this machine has no CUDA GPU "
                         f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    return dev


def load_pipeline(model: str, device, dtype: torch.dtype):
    """A diffusers pipeline from a local folder (or a hub id when it is not a path)."""
    from diffusers import DiffusionPipeline

    looks_like_path = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
    if looks_like_path:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--model {model!r}: no such folder")
        if not (folder / "model_index.json").is_file():
            raise UsageError(f"--model {model!r}: not a diffusers pipeline folder (no model_index.json in it)")
        model = str(folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {model!r}: diffusers could not load it: {exc}") from None
    return pipe.to(device)


def denoiser_of(pipe, model: str):
    """(the pipeline's UNet or transformer, the UNet's config as a dict or None): what LoRA files are
    checked against, and what SDXL kohya keys need to be converted."""
    unet = getattr(pipe, "unet", None)
    denoiser = unet if unet is not None else getattr(pipe, "transformer", None)
    if denoiser is None:
        raise UsageError(f"--model {model!r}: {type(pipe).__name__} has no unet or transformer to fuse LoRAs into")
    return denoiser, (dict(unet.config) if unet is not None else None)


def _parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: int | float | bool | None | str}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = {"True": True, "False": False, "None": None}.get(value, value)
    return options


def run(args: argparse.Namespace) -> dict:
    from . import accelerate_fusion
    from .demo import StepTimer, _quiet_libraries, gate_summary
    from .integrations.lora_files import check_against_model, load_lora_layers

    _quiet_libraries()
    for role in ("subject", "style"):
        path = getattr(args, role)
        if not os.path.isfile(path):
            raise UsageError(f"--{role} {path!r}: no such file")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    options = _parse_options(args.option)
    out = Path(args.out)

    pipe = load_pipeline(args.model, device, dtype)
    denoiser, unet_config = denoiser_of(pipe, args.model)
    for role in ("subject", "style"):  # all checks before anything is loaded into the pipeline
        path = getattr(args, role)
        check_against_model(load_lora_layers(path, unet_config=unet_config), denoiser, path)
    for role in ("subject", "style"):
        pipe.load_lora_weights(getattr(args, role), adapter_name=role)
    handle = accelerate_fusion(pipe, "subject", "style", method=args.method, backend=args.backend, **options)

    call = {"prompt": args.prompt, "num_inference_steps": args.steps,
            "generator": torch.Generator(device="cpu").manual_seed(args.seed)}
    for key in ("negative_prompt", "guidance_scale", "height", "width"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)
    timer = StepTimer(denoiser, device)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            image = pipe(**call).images[0]
    finally:
        timer.remove()
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "image.png")
    heatmap = None
    try:
        handle.plot_gates(out / "gates.png")
        heatmap = "gates.png"
    except ImportError:
        pass
    import diffusers

    report = {
        "model": args.model, "subject": args.subject, "style": args.style, "method": args.method,
        "options": options, "prompt": args.prompt, "steps": args.steps, "seed": args.seed,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "backend": args.backend,
        "layers_fused": handle.num_layers, "fallbacks": dict(handle.fallbacks),
        "seconds": seconds, "ms_per_denoiser_call": 1e3 * timer.per_step() if timer.times else None,
        "gates": gate_summary(handle.gate_log), "image": "image.png", "heatmap": heatmap,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    handle.remove()
    (out / "run.json").write_text(json.dumps(report, indent=2))
    return report


def main(args: argparse.Namespace) -> int:
    try:
        report = run(args)
    except ValueError as exc:  # UsageError, bad LoRA files, fusion options: the message names the culprit
        print(f"lorafuse generate: {exc}", file=sys.stderr)
        return 2
    share = report["gates"]["subject_share"]
    print(f"lorafuse generate: {report['method']} on {report['layers_fused']} layers, {report['steps']} steps in "
          f"{report['seconds']:.1f} s"
          + (f"; the subject acts in {100 * share:.0f}% of layer calls" if share is not None else "")
          + f"\n  wrote {Path(args.out) / 'image.png'}" + (f", {Path(args.out) / 'gates.png'}" if report["heatmap"] else "")
          + f", {Path(args.out) / 'run.json'}")
    return 0
