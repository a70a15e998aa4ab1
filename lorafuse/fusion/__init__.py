"""Fusion methods: what each layer selects, per step and sample. Pure math on small tensors.

``get_method(name, **options)`` builds one by name:

    "klora"    K-LoRA (top-K importance, flip table)     pattern, alpha, beta, balance, k, tau_mode, stats_backend
    "est"      EST-LoRA (energies, style discrepancy D)  D, pattern, alpha, balance, tau_mode, stats_backend
    "kl"       KL dynamic selection, per sample          direction, reduction, tie, mode, compiled
    "merge"    linear merge (diffusers set_adapters)     subject_weight, style_weight
    "subject"  subject LoRA only                         -
    "style"    style LoRA only                           -
"""

from __future__ import annotations

import inspect

from .base import SUBJECT, STYLE, Decision, FusionMethod, LayerLoRAs, Progress
from .est import ESTLoRA
from .kl import KLDynamic
from .klora import KLoRA
from .merge import ConstantGates, LinearMerge, StyleOnly, SubjectOnly
from .schedule import official_tau, tau_from_sigma, tau_from_timestep, time_scale

METHODS: dict[str, type[FusionMethod]] = {
    "klora": KLoRA, "est": ESTLoRA, "kl": KLDynamic, "merge": LinearMerge, "subject": SubjectOnly, "style": StyleOnly,
}


def _method_key(name) -> str:
    """``name`` lower-cased, or ValueError naming the valid methods."""
    key = name.lower() if isinstance(name, str) else None
    if key not in METHODS:
        raise ValueError(f"unknown fusion method {name!r}; valid names: {', '.join(METHODS)}")
    return key


def method_options(name: str) -> tuple[str, ...]:
    """The keyword options ``get_method(name, ...)`` accepts (``name`` case-insensitive; ValueError
    naming the valid methods for an unknown one)."""
    cls = METHODS[_method_key(name)]
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def get_method(name: str, **options) -> FusionMethod:
    """A new, unprepared :class:`FusionMethod` ``name`` (case-insensitive) built with ``options``.

    Raises ValueError naming the valid methods for an unknown name, and the valid options of the
    method for an unknown option (option values are checked by the constructors)."""
    key = _method_key(name)
    valid = method_options(key)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"fusion method {key!r}: unknown option(s) {unknown}; valid options: {', '.join(valid) or 'none'}"
        )
    return METHODS[key](**options)


__all__ = [
    "METHODS", "STYLE", "SUBJECT", "ConstantGates", "Decision", "ESTLoRA", "FusionMethod", "KLDynamic", "KLoRA",
    "LayerLoRAs", "LinearMerge", "Progress", "StyleOnly", "SubjectOnly", "get_method", "method_options",
    "official_tau", "tau_from_sigma", "tau_from_timestep", "time_scale",
]
