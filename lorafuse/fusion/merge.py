"""Constant gates: the linear merge diffusers' ``set_adapters([c, s], [w_c, w_s])`` applies, and the
single-LoRA baselines:

    merge:    y = x W^T + b + w_c d_c + w_s d_s          (d_i = s_i (x A_i^T) B_i^T)
    subject:  gates (1, 0)        style:  gates (0, 1)
"""

from __future__ import annotations

import torch

from ..kernels import PackedLoRA, fused_lora_linear
from ._common import check_float, validate_layers
from .base import Decision, FusionMethod, Progress


class ConstantGates(FusionMethod):
    """Fixed gates (w_c, w_s) for every layer and step; :meth:`begin_step` does nothing."""

    name = "constant"

    def __init__(self, weights: tuple[float, float]):
        self._weights = tuple(check_float(w, f"weight {i}", self.name) for i, w in enumerate(weights))
        self._n = 0

    @property
    def num_layers(self) -> int:
        return self._n

    def prepare(self, layers, device=None) -> None:
        pairs = validate_layers(layers, self.name)
        self._n = len(pairs)
        device = torch.device(device) if device is not None else pairs[0][0][0].device
        self._gates = torch.tensor(self._weights, dtype=torch.float32, device=device)

    def begin_step(self, progress: Progress) -> None:
        pass

    def layer_forward(self, layer, x, weight, bias, packed: PackedLoRA, *, backend: str = "auto"):
        return fused_lora_linear(x, weight, bias, packed, gates=self._gates, backend=backend)

    def layer_gates(self, layer: int):
        """``(gates, weights)``: the same row, known on the host, for every layer and call."""
        return self._gates, self._weights

    def last_decision(self, layer: int) -> Decision:
        return Decision(self._gates.reshape(1, 2))

    def step_decisions(self) -> Decision | None:
        return Decision(self._gates.expand(self._n, 2)) if hasattr(self, "_gates") else None


class LinearMerge(ConstantGates):
    """Options: ``subject_weight``, ``style_weight`` (default 1.0 each, diffusers' default)."""

    name = "merge"

    def __init__(self, *, subject_weight: float = 1.0, style_weight: float = 1.0):
        super().__init__((check_float(subject_weight, "subject_weight", self.name),
                          check_float(style_weight, "style_weight", self.name)))


class SubjectOnly(ConstantGates):
    """Only the subject LoRA acts (gates (1, 0)); no options."""

    name = "subject"

    def __init__(self):
        super().__init__((1.0, 0.0))


class StyleOnly(ConstantGates):
    """Only the style LoRA acts (gates (0, 1)); no options."""

    name = "style"

    def __init__(self):
        super().__init__((0.0, 1.0))
