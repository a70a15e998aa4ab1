"""`lorafuse generate`: fuse a subject and a style LoRA file into a local diffusers model and generate.

    lorafuse demo    # once: saves a tiny pipeline and two LoRA files in ./lorafuse-demo/
    lorafuse generate --model lorafuse-demo/pipeline --subject lorafuse-demo/loras/subject.safetensors \\
        --style lorafuse-demo/loras/style.safetensors --method klora --prompt "a sks dog in watercolor style" \\
        --steps 10 --out lorafuse-out

Checks the arguments, the output folder, the device and both LoRA files first (against the UNet
config of the model folder), then loads the pipeline class named in the folder's model_index.json,
checks the LoRA layers against its denoiser, loads them with
`pipe.load_lora_weights(..., adapter_name="subject" / "style")`, installs `lorafuse.accelerate_fusion`
and writes image.png, gates.png (the gate heatmap, when matplotlib is installed) and run.json
(arguments, versions, timings, gate summary) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._common import (UsageError, add_command, check_device_name, check_out_dir, check_positive, check_safetensors,
                      quiet_libraries, require, resolve_device)

SUMMARY = "fuse two LoRA files into a local diffusers model and generate an image"
METHODS = ("klora", "est", "kl", "merge", "subject", "style")  # lorafuse.fusion.METHODS (a test keeps them equal)
HANDLE_OPTIONS = ("log_gates", "timestep_divisor")  # --option keys for accelerate_fusion itself, not the method
DTYPES = ("float16", "bfloat16", "float32")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "generate", SUMMARY, __doc__, main)
    p.add_argument("--model", required=True,
                   help="local diffusers pipeline folder (with model_index.json), e.g. lorafuse-demo/pipeline")
    p.add_argument("--subject", required=True, help="subject LoRA .safetensors file")
    p.add_argument("--style", required=True, help="style LoRA .safetensors file")
    p.add_argument("--method", default="klora", choices=METHODS, help="fusion method (default klora)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: none)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 "
                   "(default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernel backend (default auto: Triton on CUDA, torch elsewhere)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option pattern=s --option D=0.4 (repeatable)")
    p.add_argument("--out", default="lorafuse-out", help="output folder (default ./lorafuse-out)")
    return p


def check_model_folder(model: str, arg: str = "--model") -> Path:
    """``model`` as a local diffusers pipeline folder (UsageError otherwise; no loading)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{arg} {model!r}: no such folder; give a local diffusers pipeline folder "
                         "(`lorafuse demo` saves one in lorafuse-demo/pipeline)")
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"{arg} {model!r}: not a diffusers pipeline folder (no model_index.json in it)")
    return folder


def unet_config_of(folder: Path) -> dict | None:
    """The UNet's config.json of a pipeline folder (what SDXL kohya keys need), None without a UNet."""
    path = folder / "unet" / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {str(folder)!r}: unreadable {path.name} in unet/ ({exc})") from None


def load_pipeline(model: str, device, dtype):
    """A diffusers pipeline from a local folder."""
    from diffusers import DiffusionPipeline

    from ..integrations.compat import diffusers_dtype_kwargs

    folder = check_model_folder(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), **diffusers_dtype_kwargs(dtype))
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


def parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: int | float | bool | None | str}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option D=0.4")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = {"True": True, "False": False, "None": None}.get(value, value)
    return options


def check_method_options(method: str, options: dict) -> None:
    """Build the method once (no model needed) so unknown options and bad values fail now."""
    from ..fusion import get_method

    method_options = {k: v for k, v in options.items() if k not in HANDLE_OPTIONS}
    try:
        get_method(method, **method_options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--option: {exc}") from None
    D = method_options.get("D")
    if method == "est" and D is not None and not 0.0 <= D <= 2.0:  # D = 1 - cos(., .)
        raise UsageError(f"--option D={D}: EST's style discrepancy D = 1 - cos(DINO(subject), DINO(style)) lies in "
                         "[0, 2]; give a value there (default 0.5)")


def check_arguments(args: argparse.Namespace) -> dict:
    """Every check that needs no model: returns what the run needs (options, LoRA layers, out folder)."""
    check_positive(args.steps, "--steps")
    for arg in ("height", "width"):
        value = getattr(args, arg)
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{arg} {value}: must be a positive multiple of 8 (e.g. {max(8, value // 8 * 8)})")
    check_device_name(args.device)
    options = parse_options(args.option)
    folder = check_model_folder(args.model)
    for role in ("subject", "style"):
        check_safetensors(getattr(args, role), f"--{role}")
    require("diffusers", "transformers", "peft")
    out = check_out_dir(args.out)
    check_method_options(args.method, options)
    device = resolve_device(args.device)
    from ..integrations.lora_files import read_lora_file

    unet_config = unet_config_of(folder)
    layers = {}
    for role in ("subject", "style"):
        try:
            layers[role] = read_lora_file(getattr(args, role), unet_config=unet_config).layers
        except ValueError as exc:
            raise UsageError(f"--{role}: {exc}") from None
    return {"options": options, "layers": layers, "out": out, "device": device}


def run(args: argparse.Namespace) -> dict:
    checked = check_arguments(args)
    import torch

    from .. import accelerate_fusion
    from ..engine.gate_plot import plot_gate_log
    from ..integrations.lora_files import check_against_model
    from ..integrations.step_timer import StepTimer
    from .demo import gate_summary

    quiet_libraries()
    device, options, out = checked["device"], checked["options"], checked["out"]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.model, device, dtype)
    denoiser, _ = denoiser_of(pipe, args.model)
    for role in ("subject", "style"):  # all checks before anything is loaded into the pipeline
        try:
            check_against_model(checked["layers"][role], denoiser, getattr(args, role))
        except ValueError as exc:
            raise UsageError(f"--{role}: {exc}") from None
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
    image.save(out / "image.png")
    heatmap = None
    if handle.gate_log:
        try:
            plot_gate_log(handle.gate_log, out / "gates.png", layer_names=handle.layer_names,
                          title=f"lorafuse generate: {args.method}")
            heatmap = "gates.png"
        except ImportError:  # matplotlib is optional (the "plot" extra)
            pass
    import diffusers

    report = {
        "model": args.model, "subject": args.subject, "style": args.style, "method": args.method,
        "options": options, "prompt": args.prompt, "steps": args.steps, "seed": args.seed,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "backend": args.backend,
        "layers_fused": handle.num_layers, "layer_names": list(handle.layer_names), "fallbacks": dict(handle.fallbacks),
        "seconds": seconds, "ms_per_denoiser_call": 1e3 * timer.median() if timer.times else None,
        "gates": gate_summary(handle.gate_log), "image": "image.png", "heatmap": heatmap,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    handle.remove()
    (out / "run.json").write_text(json.dumps(report, indent=2))
    return report


def main(args: argparse.Namespace) -> int:
    report = run(args)
    out = Path(args.out)
    share = report["gates"]["subject_share"]
    print(f"lorafuse generate: {report['method']} on {report['layers_fused']} layers, {report['steps']} steps in "
          f"{report['seconds']:.1f} s"
          + (f"; the subject acts in {100 * share:.0f}% of layer calls" if share is not None else "")
          + f"\n  wrote {out / 'image.png'}" + (f", {out / 'gates.png'}" if report["heatmap"] else "")
          + f", {out / 'run.json'}")
    return 0
