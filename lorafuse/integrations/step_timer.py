"""Wall time of every forward of a module (a denoiser): what ``lorafuse demo``, ``generate`` and
``sweep`` report per denoiser call."""

from __future__ import annotations

import statistics
import time

import torch


class StepTimer:
    """Wall time of every forward of ``module`` (pre/post hooks, CUDA synchronised on CUDA devices).
    ``remove()`` takes the hooks off."""

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

    def steady(self) -> list[float]:
        """Seconds per denoiser call, the run's first (warm-up) call left out when there are more."""
        return self.times[1:] if len(self.times) > 1 else list(self.times)

    def median(self) -> float | None:
        """Median of :meth:`steady` (None before the first call)."""
        times = self.steady()
        return statistics.median(times) if times else None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
