"""``fuse_module``: the building block for libraries that are not diffusers + PEFT.

Patches one plain ``nn.Linear`` so that its forward computes, through the fused kernel,

    y = x W^T + b + g_c(tau) s_c (x A_c^T) B_c^T + g_s(tau) s_s (x A_s^T) B_s^T

with the gates of the chosen fusion method. The caller drives the sampler's progress::

    fused = lorafuse.fuse_module(linear, subject=(A_c, B_c, 1.0), style=(A_s, B_s, 1.0), method="klora")
    for t in scheduler.timesteps:
        fused.step(tau=1 - t / 1000)     # once per denoiser call
        y = linear(x)                    # fused forward
    fused.remove()                       # the module is exactly as before

For several layers that share one method (K-LoRA's gamma is global), use :func:`fuse_modules`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..fusion import Decision, LayerLoRAs, Progress, get_method
from ..fusion.base import FusionMethod
from ..kernels import PackedLoRA


# a LoRA as fuse_module takes it: A (r, in), B (out, r), scale (a float or a 0-d tensor)
LoRATriple = tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]


class ModuleFusion:
    """Handle of :func:`fuse_modules`: ``step`` sets the progress, ``remove`` restores the modules."""

    modules: list[nn.Linear]
    method: FusionMethod
    backend: str

    def __init__(self, modules: Sequence[nn.Linear], method: FusionMethod, layers: Sequence[LayerLoRAs], backend: str):
        self.modules = list(modules)
        self.method = method
        self.backend = backend
        self._packed: dict[int, PackedLoRA] = {}
        self._step = -1  # the first step() is denoiser call 0
        method.prepare(layers, device=self.modules[0].weight.device)
        if getattr(method, "tau_mode", None) != "official":  # official mode needs num_steps: step() gives it
            method.begin_step(Progress(tau=0.0, step=0))
        self._forwards = [self._make_forward(i, m, layer) for i, (m, layer) in enumerate(zip(self.modules, layers))]
        for module, forward in zip(self.modules, self._forwards):
            module.forward = forward

    def _make_forward(self, index: int, module: nn.Linear, layer: LayerLoRAs):
        def forward(x: torch.Tensor) -> torch.Tensor:
            packed = self._packed.get(index)
            if packed is None or packed.dtype != x.dtype or packed.device != x.device:
                packed = self._packed[index] = PackedLoRA.pack([layer.subject, layer.style], dtype=x.dtype, device=x.device)
            return self.method.layer_forward(index, x, module.weight, module.bias, packed, backend=self.backend)

        return forward

    def step(self, tau: float | torch.Tensor, *, step: int | None = None, num_steps: int | None = None) -> None:
        """Start a denoiser call at progress ``tau`` in [0, 1] (0 = first, noisiest step)."""
        self._step = self._step + 1 if step is None else int(step)
        self.method.begin_step(Progress(tau=tau, step=self._step, num_steps=num_steps))

    def decision(self, index: int = 0) -> Decision:
        """What module ``index`` applied on its last call."""
        return self.method.last_decision(index)

    def remove(self) -> None:
        """Restore every module's class forward (idempotent; a forward someone else set since is left alone)."""
        for module, forward in zip(self.modules, self._forwards):
            if module.__dict__.get("forward") is forward:
                del module.__dict__["forward"]
        self._packed.clear()


def _check_linear(module, i: int) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"fuse_module: module {i} must be an nn.Linear, got {type(module).__name__}")
    if "forward" in module.__dict__:
        raise ValueError(f"fuse_module: module {i} already has a patched forward (call remove() first)")
    return module


def fuse_modules(
    modules: Sequence[nn.Linear],
    subjects: Sequence[LoRATriple],
    styles: Sequence[LoRATriple],
    method: str = "merge",
    *,
    backend: str = "auto",
    names: Sequence[str] | None = None,
    **options: Any,
) -> ModuleFusion:
    """Patch several ``nn.Linear`` layers that share one fusion method (see :func:`fuse_module`)."""
    modules = [_check_linear(m, i) for i, m in enumerate(modules)]
    subjects, styles = list(subjects), list(styles)
    if not (len(modules) == len(subjects) == len(styles)) or not modules:
        raise ValueError(
            f"fuse_modules: need one subject and one style (A, B, scale) per module and at least one module, got "
            f"{len(modules)} modules, {len(subjects)} subjects, {len(styles)} styles"
        )
    first: dict[int, int] = {}
    for i, m in enumerate(modules):
        j = first.setdefault(id(m), i)
        if j != i:
            raise ValueError(f"fuse_modules: module {i} is the same object as module {j}")
    names = list(names) if names is not None else [f"module{i}" for i in range(len(modules))]
    if len(names) != len(modules):
        raise ValueError(f"fuse_modules: {len(names)} names for {len(modules)} modules")
    for i, (c, s) in enumerate(zip(subjects, styles)):
        for role, item in (("subject", c), ("style", s)):
            ok = isinstance(item, (tuple, list)) and len(item) == 3
            if not (ok and isinstance(item[0], torch.Tensor) and isinstance(item[1], torch.Tensor)):
                raise TypeError(
                    f"fuse_module: {names[i]} {role} LoRA must be an (A, B, scale) triple with tensors A and B"
                )
    layers = [LayerLoRAs(n, tuple(c), tuple(s)) for n, c, s in zip(names, subjects, styles)]
    for i, (module, layer) in enumerate(zip(modules, layers)):
        for role, (A, B, _) in (("subject", layer.subject), ("style", layer.style)):
            if A.dim() != 2 or B.dim() != 2 or A.shape[-1] != module.in_features or B.shape[0] != module.out_features:
                raise ValueError(
                    f"fuse_module: {layer.name} {role} LoRA is ({B.shape[0]} x {A.shape[-1]}) but the linear is "
                    f"({module.out_features} x {module.in_features})"
                )
    return ModuleFusion(modules, get_method(method, **options), layers, backend)


def fuse_module(
    module: nn.Linear,
    subject: LoRATriple,
    style: LoRATriple,
    method: str = "merge",
    *,
    backend: str = "auto",
    **options: Any,
) -> ModuleFusion:
    """Patch one ``nn.Linear`` with a subject and a style LoRA ``(A (r, in), B (out, r), scale)``.

    ``method`` and ``options`` as :func:`lorafuse.fusion.get_method`. Returns a :class:`ModuleFusion`.
    """
    return fuse_modules([module], [subject], [style], method, backend=backend, **options)
