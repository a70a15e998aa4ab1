"""The state of one sampling run: what a run carries from one denoiser call to the next.

A sampling run is the loop of denoiser calls of one generation (one ``pipe(...)`` call, or the
caller's own ``for t in timesteps`` loop around :meth:`ModuleFusion.step`). Its state is

    step       denoiser calls of this run so far (the next call's index, from 0)
    tau        the progress of the current call in [0, 1] (0 = first, noisiest), float or 0-d tensor
    timestep   the raw timestep value of the current call (for the gate log; None when not given)
    num_steps  the sampler's step count when known (K-LoRA / EST's official counter mode needs it)
    record     the current call's gate-log recorder ``record(layer_index)``, or None (not logging)
    marker     what tells this run from the next (the diffusers integration: the scheduler's
               ``timesteps`` tensor, replaced by every ``set_timesteps``; None for plain modules)

It belongs to the run, not to the installation: :class:`~lorafuse.engine.runtime.FusionEngine`
starts a new one at each run and its per-layer calls read the current one. The method's own
per-step state (its gate tensors) and the merged weights still live once per installation; a
server that runs concurrent requests through one installation will give each request its own
run, method step state and merged weights (see ARCHITECTURE.md, "Next").
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["SamplingRun"]


class SamplingRun:
    """One sampling run's state (see the module docstring); plain attributes, read on every layer
    call (``record``), so ``__slots__`` keeps the reads cheap."""

    __slots__ = ("marker", "step", "tau", "timestep", "num_steps", "record")

    def __init__(self, marker: Any = None):
        self.marker = marker
        self.step = 0
        self.tau: float | torch.Tensor | None = None
        self.timestep: float | torch.Tensor | None = None
        self.num_steps: int | None = None
        self.record: Callable[[int], None] | None = None

    def invalidate(self) -> None:
        """Make the next denoiser call start a new run (e.g. the pipeline's scheduler was swapped):
        no marker compares equal to a fresh object."""
        self.marker = object()

    def __repr__(self) -> str:
        return f"SamplingRun(step={self.step}, tau={self.tau!r}, num_steps={self.num_steps})"
