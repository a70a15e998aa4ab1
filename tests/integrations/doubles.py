"""A small FusionMethod test double (used only where the real methods are not needed: plumbing tests)."""

from __future__ import annotations

import torch

from lorafuse.fusion.base import Decision, FusionMethod, Progress
from lorafuse.kernels import fused_lora_linear


class SwitchDouble(FusionMethod):
    """Layer l uses the subject while tau < (l + 1) / (n + 1), then the style; records every Progress."""

    name = "switch-double"

    def __init__(self):
        self.progress: list[Progress] = []
        self.layers = []

    def prepare(self, layers, device=None):
        self.layers = list(layers)
        n = len(layers)
        self.thr = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1)
        self.gates = torch.zeros(n, 2, device=device)
        self.tau = torch.zeros((), device=device)

    def begin_step(self, progress):
        self.progress.append(progress)
        tau = torch.as_tensor(progress.tau, dtype=torch.float32, device=self.gates.device)
        self.tau = tau
        sub = (tau < self.thr).float()
        self.gates.copy_(torch.stack([sub, 1 - sub], 1))

    def layer_forward(self, layer, x, weight, bias, packed, *, backend="auto"):
        return fused_lora_linear(x, weight, bias, packed, self.gates[layer], backend=backend)

    def last_decision(self, layer):
        return Decision(self.gates[layer: layer + 1], self.tau, {"threshold": self.thr[layer]})

    @property
    def num_layers(self):
        return len(self.layers)
