"""KL dynamic selection (Cao et al., arXiv 2602.15539, feature-level selection): per layer, per
forward and per sample, the LoRA that moves the output distribution more acts.

For a layer call with rows x_m (M = G samples x T tokens), f0 = x W^T + b and d_i = s_i (x A_i^T) B_i^T:

    p0 = softmax(f0_m), p_i = softmax(f0_m + d_i,m) over the N output channels, per token m
    "forward":  k_i,m = KL(p0 || p_i)        "reverse":  k_i,m = KL(p_i || p0)
    "sample":   D_i,g = mean of k_i,m over the T tokens of sample g      (one decision per sample)
    "batch":    D_i   = mean of k_i,m over all M rows                     (one decision for all)
    subject  iff  D_c > D_s, or D_c >= D_s with tie="subject" (the default: algorithms.md §3(b))

The statistics come from the fused kernel's epilogue (:func:`lorafuse.kernels.reduce_lora_stats`).
Two execution modes give the same decisions:

    "speculative" (default): y = fused(x; g_old) with statistics; g_new = decide(stats) on the device;
        y += U (g_new - g_old) B^T  (lora_fixup: a no-op on the device for unflipped samples);
        g_old <- g_new  (a preallocated (G, 2) tensor per layer; reallocated when G changes)
    "two_pass" (reference): stats = fused(x) statistics, decide, y = fused(x; g_new)

Nothing reads a device value on the host. Zero LoRAs have k = 0 exactly (ties).
"""

from __future__ import annotations

import torch

from ..kernels import PackedLoRA, fused_lora_forward, fused_lora_linear, lora_fixup, reduce_lora_stats
from ._common import check_choice, validate_layers
from .base import Decision, FusionMethod, Progress


class KLDynamic(FusionMethod):
    """Options: ``direction`` "forward" | "reverse", ``reduction`` "sample" | "batch", ``tie``
    "subject" | "style", ``mode`` "speculative" | "two_pass"."""

    name = "kl"
    dynamic = True

    def __init__(self, *, direction: str = "forward", reduction: str = "sample", tie: str = "subject",
                 mode: str = "speculative"):
        self.direction = check_choice(direction, ("forward", "reverse"), "direction", self.name)
        self.reduction = check_choice(reduction, ("sample", "batch"), "reduction", self.name)
        self.tie = check_choice(tie, ("subject", "style"), "tie", self.name)
        self.mode = check_choice(mode, ("speculative", "two_pass"), "mode", self.name)
        self._n = 0

    @property
    def num_layers(self) -> int:
        return self._n

    def prepare(self, layers, device=None) -> None:
        self._n = len(validate_layers(layers, self.name))
        self._prev: list[torch.Tensor | None] = [None] * self._n  # gates last applied, per layer
        self._divs: list[torch.Tensor | None] = [None] * self._n  # (G, 2) divergences of the last call
        self._tau = None

    def begin_step(self, progress: Progress) -> None:
        self._tau = progress.tau

    def decide(self, stats, num_samples: int, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row statistics -> (gates (G, 2) fp32 one-hot, divergences (G, 2) fp32), on the device."""
        k = stats.kl if self.direction == "forward" else stats.kl_reverse  # (M, 2)
        if self.reduction == "sample":
            d = k.reshape(num_samples, rows_per_sample, 2).mean(dim=1)
        else:
            d = k.mean(dim=0, keepdim=True).expand(num_samples, 2)
        subject = d[:, 0] >= d[:, 1] if self.tie == "subject" else d[:, 0] > d[:, 1]
        return torch.stack((subject, ~subject), dim=1).to(torch.float32), d

    def _state(self, layer: int, shape: tuple, device) -> torch.Tensor:
        prev = self._prev[layer]
        if prev is None or prev.shape != shape or prev.device != device:  # host-known shape info only
            prev = torch.zeros(shape, dtype=torch.float32, device=device)
            prev[..., 0 if self.tie == "subject" else 1] = 1.0
            self._prev[layer] = prev
        return prev

    def layer_forward(self, layer, x, weight, bias, packed: PackedLoRA, *, backend: str = "auto"):
        if not 0 <= layer < self._n:
            raise IndexError(f"{self.name}: layer {layer} out of range (prepared {self._n} layers)")
        G = x.shape[0] if x.dim() >= 2 else 1
        shape = (G, 2) if x.dim() >= 2 else (2,)
        rows = max(1, (x.numel() // x.shape[-1] if x.shape[-1] else 0) // max(G, 1))
        if G == 0 or x.numel() == 0:
            return fused_lora_linear(x, weight, bias, packed, backend=backend)
        if self.mode == "two_pass":
            _, st = fused_lora_linear(x, weight, bias, packed, stats=True, backend=backend)
            g, d = self.decide(st, G, rows)
            self._prev[layer], self._divs[layer] = g.reshape(shape), d
            return fused_lora_linear(x, weight, bias, packed, gates=g.reshape(shape), backend=backend)
        prev = self._state(layer, shape, x.device)
        out = fused_lora_forward(x, weight, bias, packed, gates=prev, stats=True, backend=backend)
        st = reduce_lora_stats(out.partials, packed.num_loras, backend="triton" if out.partials.is_cuda else "torch")
        g, d = self.decide(st, G, out.rows_per_sample)
        lora_fixup(out.y, out.u, packed, g.reshape(shape) - prev, out.rows_per_sample, backend=backend)
        prev.copy_(g.reshape(shape))
        self._divs[layer] = d
        return out.y

    def last_decision(self, layer: int) -> Decision:
        """Gates (G, 2) of the layer's last call and ``stats["kl"]``: the (G, 2) divergences D_i.
        Tensors are live state (the speculative gates are updated in place on the next call)."""
        g = self._prev[layer]
        if g is None:
            return Decision(torch.zeros(1, 2), self._tau, {})
        return Decision(g.reshape(-1, 2), self._tau, {"kl": self._divs[layer]})
