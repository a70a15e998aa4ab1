"""diffusers integration: ``accelerate_fusion(pipe, subject=..., style=..., method=...)`` and
``remove_fusion(pipe)``, the entry points.

Design (research/diffusers.md, option A): the PEFT ``lora.Linear`` layers stay in the module tree and
get an *instance* ``forward`` that reads the live PEFT state on every call (active adapters,
``scaling`` floats or 0-d tensors, the per-call ``scale`` diffusers applies by mutating ``scaling``,
``disable_adapters``, ``merged``) and hands the call to the engine (:mod:`lorafuse.engine`: merged
weights or the fused kernel, the gate log). A call the engine cannot take falls back, layer by layer,
with one warning per reason, to a slower way to the method's own result, or to PEFT's forward as it
is where the user's PEFT state decides. A forward pre-hook on each denoiser turns the timestep into
the progress ``tau`` and starts the engine's denoiser call.

Beside this file, each with one job: ``handle`` (:class:`FusionHandle`: install, remove, summary),
``peft_layer`` (a patched layer's PEFT state and its check), ``layer_hook`` (one layer call),
``denoiser_hook`` (one denoiser call), ``fallbacks``, ``coverage`` (LoRA layers the kernels do not
patch), ``watches`` (hotswap, offloading, text encoders), ``discovery`` (denoisers and their LoRA
layers), ``timestep`` (timestep -> tau), ``peft_state`` (keys of a PEFT layer's weights, diffusers'
hooks on it), ``replay`` (PEFT's forward driven by decisions), ``offload`` (offloading hooks).
ARCHITECTURE.md follows one layer call and one denoiser call through them.

diffusers and PEFT are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

from torch import nn

from ..engine import check_engine_options, check_log_options
from ..fusion import FusionMethod, get_method
from .coverage import COVERAGES
from .discovery import _find_denoisers, _unwrap
from .fallbacks import FusionFallbackWarning
from .handle import _HANDLE_ATTR, AttachedHandle, FusionHandle, installed_fusion
from .lora_files import warn_alpha_mismatches
from .timestep import _timestep_divisor

__all__ = [
    "FusionHandle", "FusionFallbackWarning", "accelerate_fusion", "installed_fusion", "register_guidance", "remove_fusion",
]

_log = logging.getLogger("lorafuse")

# config type -> enable(pipe, config) -> AttachedHandle, for accelerate_fusion(guidance=config); the
# guidance package registers its GuidanceConfig (it sits above the integrations, which never import it)
_GUIDANCE: dict[type, Callable[[Any, Any], AttachedHandle]] = {}


def register_guidance(config_type: type, enable: Callable[[Any, Any], AttachedHandle]) -> None:
    """Let ``accelerate_fusion(pipe, ..., guidance=config)`` install a ``config_type`` (or subclass)
    ``config`` as ``enable(pipe, config)``; :mod:`lorafuse.guidance` registers its ``GuidanceConfig``."""
    _GUIDANCE[config_type] = enable


def _guidance_installer(config) -> Callable[[Any, Any], AttachedHandle]:
    for cls in type(config).__mro__:
        if cls in _GUIDANCE:
            return _GUIDANCE[cls]
    raise TypeError(f"accelerate_fusion: guidance must be a lorafuse.guidance.GuidanceConfig, got {type(config).__name__}")


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def accelerate_fusion(
    pipe: Any,
    subject: str,
    style: str,
    method: str | FusionMethod = "klora",
    *,
    backend: str = "auto",
    log_gates: bool | str | int = True,
    gate_log_sink: Callable[[list[dict]], None] | str | os.PathLike[str] | None = None,
    timestep_divisor: float | None = None,
    guidance: Any = None,
    weights: str = "scratch",
    progress: bool | None = None,
    coverage: str = "method",
    **method_options: Any,
) -> FusionHandle:
    """Fuse the LoRA adapters ``subject`` and ``style`` of a diffusers pipeline with a fusion method.

    Args:
        pipe: a diffusers pipeline (its ``unet`` / ``transformer`` are patched; text encoders stay on
            PEFT) or a denoiser module itself.
        subject, style: adapter names given to ``pipe.load_lora_weights(..., adapter_name=...)``.
        method: "klora", "est", "kl", "merge" (see :func:`lorafuse.fusion.get_method`) or a
            :class:`~lorafuse.fusion.base.FusionMethod` instance.
        backend: kernel backend for the method ("auto", "torch", "triton").
        log_gates: what :attr:`FusionHandle.gate_log` keeps of the decisions (small device copies
            per layer call, converted when read): True (default) the last sampling run (a new
            ``pipe(...)`` call drops the previous one's records: memory stays flat in a service),
            "all" everything since installation, an int N the last N denoiser calls, False nothing.
        gate_log_sink: stream every record out as well: a callable that gets a list of gate-log
            entries per denoiser call, or a file path that gets one JSON line per entry appended.
            A call's records go out when it ends (at the next denoiser call, the next read of
            ``gate_log``, ``remove()``); with ``log_gates=False`` nothing is held in memory.
        timestep_divisor: override what the denoiser's ``timestep`` is divided by to get the noise
            level (default: scheduler ``num_train_timesteps``; 1 for FLUX, whose pipeline passes t/1000).
        guidance: a :class:`lorafuse.guidance.GuidanceConfig`: also install metric-guided latent
            refinement (Cao et al.; usually with ``method="kl"``), a wrapped ``scheduler.step`` that
            ``handle.guidance`` owns and ``handle.remove()`` undoes. Needs a pipeline with a VAE.
        weights: where methods whose gates are fixed within a denoiser call (klora, est, merge,
            subject, style; official tau mode too) keep each patched layer's merged weight
            ``W + g_c dW_c + g_s dW_s``, rebuilt from the original only when the gates, scalings or
            weights change, so that a call is one ``F.linear``: "scratch" (default; a device copy
            per patched layer, the original untouched), "inplace" (written into the layer's weight,
            the original kept in host memory and written back before PEFT's own code uses the layer
            and on ``remove()``) or "off" (the fused low-rank path on every call). Dynamic methods
            (kl) always run the fused path. See :mod:`lorafuse.engine.merged`.
        progress: show a progress bar while the method prepares its per-layer statistics, when
            that takes more than a second (None: unless the pipeline's progress bar is disabled
            with ``pipe.set_progress_bar_config(disable=True)``).
        coverage: what the two adapters' LoRA layers that the kernels do not patch compute (conv
            LoRAs: SD1.5's 1x1 ``proj_in``/``proj_out``, kohya LoCon; layers only one adapter
            targets): "method" (default) the method's rule through PEFT's own forward of the layer
            (merge weights, klora / est's selection from the layer's own scores, kl's per-sample
            decision; a single adapter acts alone under a selecting method), "peft" PEFT's sum of
            the active adapters, as loading the LoRAs gives, "none" neither adapter (the base layer:
            the official K-LoRA code's result there) (see :mod:`lorafuse.integrations.coverage`).
            ``handle.summary()`` counts the layers per policy and reason.
        **method_options: passed to ``get_method`` (pattern, alpha, beta, D, official mode, ...).

    Returns a :class:`FusionHandle`; ``handle.remove()`` or :func:`remove_fusion` undo everything.
    Calling again on the same pipeline replaces the previous installation.

    Which adapters are active: on every LoRA layer of the denoiser(s) that holds ``subject`` or
    ``style``, exactly ``[subject, style]`` (other adapters of those layers are inactive there until
    ``remove()``); the method's gates then pick per layer and step. Text encoders keep the adapters you
    activated; "merge", "subject" and "style" weight their LoRA scalings as ``set_adapters`` would.
    A :class:`~lorafuse.integrations.lora_files.LoRAAlphaWarning` says when diffusers / PEFT loaded one
    of the two adapters with other per-layer scales than its file (kohya files with per-layer alphas;
    :func:`~lorafuse.integrations.lora_files.fix_peft_alphas` repairs them).

    What falls back, and why: a patched layer call the fused / merged path cannot take runs PEFT's
    own forward (warned once per reason, counted in :attr:`FusionHandle.fallbacks`):

    - driven with the method's gates (only the selected adapter active: same result, slower) for DoRA
      or LoRA bias, a base layer that is not a plain ``nn.Linear`` (quantized), weights on meta or on
      another device than the input (accelerate's sequential offload), weights onloaded by the
      layer's own hooks (leaf-level group offloading), a storage dtype other than the
      compute dtype, autograd through trainable weights, LoRA dropout in training mode. "kl" decides
      inside its fused kernel: there PEFT applies the sum of both adapters, and the warning says so;
    - as your PEFT state says (no gates) after ``disable_lora()`` (the base layer), ``fuse_lora()``,
      ``set_adapters`` to other adapters, ``adapter_names=`` calls, a deleted adapter, and calls
      outside a denoiser call.

    LoRA layers that are never patched (conv LoRAs, layers only one of the adapters targets, layers
    that already have an instance forward, e.g. from ``enable_layerwise_casting``) apply PEFT's sum;
    :meth:`FusionHandle.summary` and one INFO line on the ``lorafuse`` logger list them per reason.

    Order with other diffusers features:

    - ``torch.compile`` (whole module or regional): before or after; the compiled module's layers are
      patched. A compiled layer of a method with per-call gates reads its merged weight as a graph
      input (made current before the graph runs); kl traces its statistics and decision.
    - offloading: before or after. Block-level group offloading and model offload keep the merged /
      fused path (merged weights are rebuilt after each onload, which gives new tensors; "scratch"
      keeps its copies on the onload device, so "inplace" or "off" save device memory); sequential
      and leaf-level offloading fall back as above. With ``weights="inplace"`` the originals are
      written back before the pipeline's or denoiser's ``enable_model_cpu_offload``,
      ``enable_sequential_cpu_offload``, ``enable_group_offload`` or ``enable_layerwise_casting``
      copies the weights (``accelerate.cpu_offload`` called directly gets them at the first fallback;
      call ``apply_group_offloading`` directly only before ``accelerate_fusion`` or its first image).
    - hotswap: ``pipe.load_lora_weights(file, adapter_name=<subject or style>, hotswap=True)`` on the
      pipeline re-prepares the method, the packed factors and the merged weights.
    - ``fuse_lora()``: unfuse before ``accelerate_fusion`` (it raises otherwise); after it, PEFT's
      merged sum runs (warned).
    """
    if not isinstance(subject, str) or not isinstance(style, str):
        raise TypeError("accelerate_fusion: subject and style must be adapter names (str)")
    check_engine_options("accelerate_fusion", weights, backend)  # now, not inside the first pipe() call
    check_log_options("accelerate_fusion", log_gates, gate_log_sink)
    if coverage not in COVERAGES:
        raise ValueError(f"accelerate_fusion: coverage must be one of {COVERAGES}, got {coverage!r}")
    enable_guidance = _guidance_installer(guidance) if guidance is not None else None
    denoisers = _find_denoisers(pipe)
    remove_fusion(pipe)  # replace a previous installation
    loaded: list[str] = []
    for _, d in denoisers:
        for name in (getattr(d, "peft_config", None) or {}):
            if name not in loaded:
                loaded.append(name)
    if len(loaded) < 2:
        raise ValueError(
            f"accelerate_fusion needs two LoRA adapters loaded in the denoiser, found {len(loaded)}: {loaded}; "
            "load them with pipe.load_lora_weights(..., adapter_name=...)"
        )
    for role, name in (("subject", subject), ("style", style)):
        if name not in loaded:
            raise ValueError(f"accelerate_fusion: {role} adapter {name!r} is not loaded; loaded adapters: {loaded}")
    if subject == style:
        raise ValueError(f"accelerate_fusion: subject and style must be two different adapters, got {subject!r} twice")
    denoisers = [(c, d) for c, d in denoisers if subject in (getattr(d, "peft_config", None) or {})
                 or style in (getattr(d, "peft_config", None) or {})]
    warn_alpha_mismatches(pipe, [subject, style])  # kohya per-layer alphas PEFT did not apply: say so
    if isinstance(method, str):
        fusion_method = get_method(method, **method_options)
    else:
        if not isinstance(method, FusionMethod):
            raise TypeError(f"accelerate_fusion: method must be a name or a FusionMethod, got {type(method).__name__}")
        if method_options:
            raise TypeError(f"accelerate_fusion: options {sorted(method_options)} given with a FusionMethod instance")
        fusion_method = method
    scheduler = None if isinstance(pipe, nn.Module) else getattr(pipe, "scheduler", None)
    div = (float(timestep_divisor) if timestep_divisor is not None
           else _timestep_divisor(_unwrap(denoisers[0][1]), scheduler))
    if not (div > 0 and math.isfinite(div)):
        raise ValueError(f"accelerate_fusion: timestep_divisor must be a positive number, got {timestep_divisor}")
    handle = FusionHandle(pipe, denoisers, fusion_method, subject, style, backend, log_gates, scheduler, div, weights,
                          coverage, gate_log_sink)
    handle._divisor_fixed = timestep_divisor is not None
    if progress is None:
        progress = not (getattr(pipe, "_progress_bar_config", None) or {}).get("disable", False)
    handle.progress = bool(progress)
    try:
        handle._install(pipe)
        info = handle.summary()
        left = [f"{n} ({why}: {what})" for key, what in (("method_gates", "the method's rule"), ("peft_sum", "PEFT's sum"),
                                                          ("no_lora", "no LoRA")) for why, n in info[key].items()]
        _log.info("accelerate_fusion %s: %d layers on the %s path%s%s; left on PEFT: %s", info["method"], info["layers"],
                  info["path"], f" (weights={info['weights']})" if info["weights"] else "",
                  f", {info['cast_layers']} of them cast per call (layerwise casting)" if info["cast_layers"] else "",
                  ", ".join(left) or "none")
        if guidance is not None:
            handle.guidance = enable_guidance(pipe, guidance)
    except BaseException:
        handle.remove()
        raise
    return handle


def remove_fusion(pipe: Any) -> bool:
    """Remove what :func:`accelerate_fusion` installed on ``pipe`` (True if something was removed)."""
    try:
        denoisers = _find_denoisers(pipe) if not isinstance(pipe, nn.Module) else [("", pipe)]
    except ValueError:
        return False
    removed = False
    for _, d in denoisers:
        h = d.__dict__.get(_HANDLE_ATTR)
        if h is not None:
            h.remove()
            removed = True
    return removed
