"""`lorafuse inspect FILE [FILE2]`: what is in LoRA files, and what K-LoRA / EST will do with them.

One file: key format, model family, number of target layers, ranks and scales (alpha / r, 1 when
the file has no alpha).
Two files (subject, style): per common layer the static statistics of the two selection methods,

    K-LoRA  S_c, S_s = sum of the K largest |dW| entries (K = r_c r_s), gamma from L1 norms
    EST     E_c, E_s = ||dW||_F^2, gamma from L1 norms (the official balance)

and the decision of each method at every step of an ``--steps`` sampler with uniform progress
tau_k = k / N (k = 0 .. N-1): a string of ``c`` (subject acts) and ``s`` (style acts), plus the
first step where the decision changes. Real samplers space their timesteps slightly differently
(tau = 1 - t / T), so a flip can move by a step. Default method options (K-LoRA "s*", EST "s"
with D = 0.5); the table is computed on the host in fp64, the same rule the device gates use.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from ._common import UsageError, add_command, check_positive, check_safetensors, require

SUMMARY = ("format, layers, ranks and scales of LoRA files; with two files the K-LoRA/EST statistics and "
           "flip step per layer")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "inspect", SUMMARY, __doc__, main)
    p.add_argument("files", nargs="+", metavar="FILE", help="one or two LoRA safetensors files (subject, style)")
    p.add_argument("--steps", type=int, default=50, help="step count for the flip table (default 50)")
    p.add_argument("--family", default=None, choices=("sd", "sdxl", "sd3", "flux"),
                   help="model family (default: guessed from the keys)")
    p.add_argument("--model", default=None, help="local diffusers folder: checks the layers against its denoiser "
                   "(and gives SDXL kohya files the UNet config they need)")
    p.add_argument("--layers", type=int, default=40, help="print at most this many layers (default 40; 0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def describe_file(path: str, family: str | None = None, unet_config: dict | None = None) -> dict:
    """Format, family, layers {path: (A, B, scale)}, rank and scale histograms of one LoRA file."""
    from ..integrations.lora_files import read_lora_file

    f = read_lora_file(path, family=family, unet_config=unet_config)
    ranks = Counter(A.shape[0] for A, _, _ in f.layers.values())
    scales = Counter(round(float(s), 6) for _, _, s in f.layers.values())
    return {"file": path, "format": f.format, "family": f.family, "keys": f.num_tensors, "layers": f.layers,
            "ranks": dict(sorted(ranks.items())), "scales": dict(sorted(scales.items()))}


def pair_statistics(subject: dict, style: dict, steps: int) -> dict:
    """K-LoRA and EST statistics and decision strings for the layers both LoRAs target."""
    from ..fusion import ESTLoRA, KLoRA, LayerLoRAs

    names = [p for p in subject if p in style]
    if not names:
        raise ValueError("the two LoRAs target no common layer")
    # prepare() checks the pairs (target shapes, finite weights); the statistics are computed in fp64
    layers = [LayerLoRAs(p, subject[p], style[p]) for p in names]
    taus = [k / steps for k in range(steps)]
    out = {"layers": names, "steps": steps}
    for key, method in (("klora", KLoRA(stats_backend="torch")), ("est", ESTLoRA(stats_backend="torch"))):
        method.prepare(layers, device="cpu")
        table = method.decision_table(taus)
        out[key] = {
            "gamma": float(method.gamma),
            "scores": method.scores.tolist(),  # (L, 2): S_c, S_s (klora) or E_c, E_s (est)
            "decisions": ["".join("c" if v else "s" for v in row) for row in table.tolist()],
            "first_flip": [_first_flip(row) for row in table.tolist()],
        }
    return out


def _first_flip(row: list[bool]) -> int | None:
    return next((k for k in range(1, len(row)) if row[k] != row[0]), None)


def _print_file(info: dict, role: str | None) -> None:
    title = f"{role}: " if role else ""
    ranks = ", ".join(f"r={r} x{n}" for r, n in info["ranks"].items())
    scales = ", ".join(f"{a:g} x{n}" for a, n in info["scales"].items())
    print(f"{title}{info['file']}\n  format {info['format']}, family {info['family']}, {info['keys']} tensors, "
          f"{len(info['layers'])} denoiser layers\n  ranks: {ranks}\n  scales (alpha / r; 1 without alpha): {scales}")


def _print_pair(stats: dict, limit: int) -> None:
    k, e = stats["klora"], stats["est"]
    names = stats["layers"]
    shown = names if limit <= 0 else names[:limit]
    print(f"\n{len(names)} common layers; gamma (L1 balance): K-LoRA {k['gamma']:.4g}, EST {e['gamma']:.4g}; "
          f"decisions over {stats['steps']} steps (tau = k/N), c = subject, s = style")
    width = max(len(n) for n in shown)
    print(f"{'layer':{width}s} {'S_c':>9s} {'S_s':>9s} {'E_c':>9s} {'E_s':>9s} {'flip K':>6s} {'flip E':>6s}  "
          f"K-LoRA / EST decisions")
    for i, name in enumerate(shown):
        (s_c, s_s), (e_c, e_s) = k["scores"][i], e["scores"][i]
        fk, fe = (("-" if f is None else str(f)) for f in (k["first_flip"][i], e["first_flip"][i]))
        print(f"{name:{width}s} {s_c:9.3g} {s_s:9.3g} {e_c:9.3g} {e_s:9.3g} {fk:>6s} {fe:>6s}  "
              f"{k['decisions'][i]}\n{'':{width + 58}s}{e['decisions'][i]}")
    if len(shown) < len(names):
        print(f"... {len(names) - len(shown)} more layers (--layers 0 shows all)")
    for key, label in (("klora", "K-LoRA"), ("est", "EST")):
        share = sum(d.count("c") for d in stats[key]["decisions"]) / (len(names) * stats["steps"])
        print(f"{label}: the subject acts in {100 * share:.0f}% of layer-steps")


def main(args: argparse.Namespace) -> int:
    files = [os.fspath(f) for f in args.files]
    if len(files) > 2:
        raise UsageError(f"FILE: give one or two LoRA files (subject, then style), got {len(files)}")
    check_positive(args.steps, "--steps")
    for i, f in enumerate(files):
        check_safetensors(f, "FILE" if len(files) == 1 else ("subject FILE", "style FILE")[i])
    if args.model:
        from .generate import check_model_folder

        check_model_folder(args.model)
    require("diffusers")
    unet_config, model = None, None
    try:
        if args.model:
            import torch

            from .generate import denoiser_of, load_pipeline

            require("transformers")
            model = load_pipeline(args.model, "cpu", torch.float32)
            denoiser, unet_config = denoiser_of(model, args.model)
        infos = [describe_file(f, args.family, unet_config) for f in files]
        if model is not None:
            from ..integrations.lora_files import check_against_model

            for info in infos:
                check_against_model(info["layers"], denoiser, info["file"])
        stats = pair_statistics(infos[0]["layers"], infos[1]["layers"], args.steps) if len(infos) == 2 else None
    except ValueError as exc:  # bad files (the message names the file and key), no common layer
        raise UsageError(str(exc)) from None
    if args.json:
        report = {"files": [{k: v for k, v in i.items() if k != "layers"} | {
            "layers": {p: {"rank": A.shape[0], "in": A.shape[1], "out": B.shape[0], "scale": float(s)}
                       for p, (A, B, s) in i["layers"].items()}} for i in infos]}
        if stats is not None:
            report["pair"] = stats
        print(json.dumps(report, indent=2))
        return 0
    for info, role in zip(infos, ("subject", "style") if len(infos) == 2 else (None,)):
        _print_file(info, role)
    if stats is not None:
        _print_pair(stats, args.layers)
    return 0
