"""What a patched layer call runs when the merged / fused path cannot take it (a fallback), and the
one-warning-per-reason report of fallbacks.

Unless the user's own PEFT state decides (adapters disabled, merged, changed, ...: PEFT's forward as
it is), the result is the method's, only slower:

- layerwise casting (diffusers' ``enable_layerwise_casting``): the method's fused path on the base
  weight cast to the compute dtype, as the cast hook would compute with (logged once, not warned);
- methods with per-call gates (klora, est, merge, ...): PEFT's forward with this call's gates (only
  the selected adapter active, or scalings times merge weights);
- kl: the same per-sample decision from PEFT's own pieces (base output, each adapter's
  perturbation; :meth:`KLDynamic.decide_from_outputs`), then per sample the selected adapter's PEFT
  output (exact for DoRA), logged as the layer's decision;
- a method with neither: PEFT's sum of both adapters, reported as such.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .peft_layer import CAST, SILENT, USERS_CHOICE, PeftLayer
from .replay import _decide_and_select, peft_forward_with_gates

_log = logging.getLogger("lorafuse")


class FusionFallbackWarning(UserWarning):
    """A patched layer ran PEFT's own forward instead of the fused path (one warning per reason)."""


class FallbackReport:
    """Counts fallback layer calls per reason into ``counts`` (the handle's ``fallbacks``) and
    warns once per reason (:class:`FusionFallbackWarning`)."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        self.warned: set[str] = set()

    def count(self, reason: str, gated: bool = False) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if reason not in SILENT:
            self.warn_once(reason, " with the method's gates (same result, slower)" if gated else "")

    def warn_once(self, reason: str, how: str = "") -> None:
        if reason in self.warned:
            return
        self.warned.add(reason)
        warnings.warn(f"lorafuse: falling back to PEFT's forward{how}: {reason} (warned once per reason)",
                      FusionFallbackWarning, stacklevel=4)

    def info_once(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if reason not in self.warned:
            self.warned.add(reason)
            _log.info("lorafuse: %s", reason)


def fallback_forward(h, rec: PeftLayer, reason: str, x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """Layer ``rec``'s call that left the merged / fused path for ``reason`` (see the module
    docstring), for the installation ``h`` (a :class:`~lorafuse.integrations.handle.FusionHandle`)."""
    if reason == CAST:
        return cast_forward(h, rec, x)
    method, engine, m = h.method, h.engine, rec.module
    gates = None
    dynamic = False
    if reason not in USERS_CHOICE:
        picked = engine.layer_gates(rec.index)
        if picked is not None:
            gates = picked[0].tolist()  # host copy: one sync on CUDA, in a fallback only
        elif hasattr(method, "decide_from_outputs"):
            dynamic = True
        else:
            reason += " (the method gives no per-call gates outside its fused kernel: PEFT's sum of both adapters)"
    h._report.count(reason, gated=gates is not None or dynamic)
    if dynamic:
        y = _decide_and_select(method, m, x, rec.names, rec.index, args, kwargs)[0]
    elif gates is None:
        return type(m).forward(m, x, *args, **kwargs)
    else:
        y = peft_forward_with_gates(m, x, gates, rec.names, *args, **kwargs)
    engine.record(rec.index)
    return y


def cast_forward(h, rec: PeftLayer, x: torch.Tensor) -> torch.Tensor:
    """Layerwise casting: the method's own path on the base weight and bias cast to x's dtype (a
    transient copy per call, as diffusers' hook makes); counted in ``fallbacks``, logged once."""
    h._report.info_once(CAST)
    base = rec.module.get_base_layer()
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    y = h.method.layer_forward(rec.index, x, base.weight.to(x.dtype), bias, rec.pack(x), backend=h.backend)
    h.engine.record(rec.index)
    return y
