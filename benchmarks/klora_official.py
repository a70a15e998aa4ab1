"""The official K-LoRA layer on a whole denoiser: the anchor a user would otherwise run.

The K-LoRA code (Ouyang et al., CVPR 2025) replaces each LoRA linear's forward by: both dense deltas
``dW_i = s_i B_i A_i`` rebuilt, both top-K sums (K = r_c r_s) recomputed, a Python ``if`` on the two
scores (a host sync per layer call), then ``base(x) + x dW^T`` with the chosen dense delta. This is that
layer, as the ``klora_official`` provider of :mod:`benchmarks.providers` computes it for one layer (fp32
deltas, top-K and delta GEMM), installed on every PEFT LoRA ``Linear`` that holds both adapters.

The selection follows the official scripts' "s*" schedule with the official call counter
(tau = ((step L + call) mod L N) / L N) and gamma = 1 (the official code's pre-computed balance is a
constant per run and costs nothing per call). It is for timing: ``benchmarks.gpu_check`` puts it in the
denoiser-step table beside bare / PEFT / lorafuse's methods.
"""

from __future__ import annotations

from typing import Callable

import torch

from lorafuse.fusion.schedule import official_tau, time_scale


def official_layer_forward(mod, x: torch.Tensor, subject: str, style: str, scale: float, *args, **kwargs):
    """One official K-LoRA layer call on PEFT LoRA layer ``mod`` (S(tau) = ``scale``)."""
    base = mod.base_layer(x, *args, **kwargs)
    a_c, b_c = mod.lora_A[subject].weight.float(), mod.lora_B[subject].weight.float()
    a_s, b_s = mod.lora_A[style].weight.float(), mod.lora_B[style].weight.float()
    d_c = (b_c @ a_c).mul_(float(mod.scaling[subject]))
    d_s = (b_s @ a_s).mul_(float(mod.scaling[style]))
    k = min(a_c.shape[0] * a_s.shape[0], d_c.numel())
    top_c = torch.topk(d_c.abs().flatten(), k).values.sum()
    top_s = torch.topk(d_s.abs().flatten(), k).values.sum()
    delta = d_c if bool(top_c > top_s * scale) else d_s  # the official `if`: a host sync per layer call
    return base + (x.float() @ delta.t()).to(base.dtype)


def install(model: torch.nn.Module, subject: str = "subject", style: str = "style",
            num_steps: int = 50) -> Callable[[], None]:
    """Patch every PEFT LoRA ``Linear`` of ``model`` holding both adapters with the official layer;
    returns the undo. Raises ``ValueError`` when no layer holds both."""
    layers = [m for m in model.modules()
              if hasattr(m, "base_layer") and isinstance(getattr(m, "base_layer"), torch.nn.Linear)
              and subject in getattr(m, "lora_A", {}) and style in getattr(m, "lora_A", {})]
    if not layers:
        raise ValueError(f"klora_official: no LoRA linear holds both {subject!r} and {style!r}")
    counter = {"calls": 0}
    n = len(layers)

    def make(mod):
        def forward(x, *args, **kwargs):
            step, call = divmod(counter["calls"], n)
            counter["calls"] += 1
            scale = time_scale(official_tau(step % num_steps, call + 1, n, num_steps), "s*")
            return official_layer_forward(mod, x, subject, style, scale, *args, **kwargs)
        return forward

    for mod in layers:
        mod.forward = make(mod)

    def undo():
        for mod in layers:
            mod.__dict__.pop("forward", None)

    return undo
