"""Reading and setting a PEFT LoRA layer's state for the fused / merged paths: its weights (also where
offloading keeps them), the keys that say whether packed factors or merged weights are still current,
the diffusers hooks wrapped around it (layerwise casting), and the active adapters an installation
sets (and restores).
"""

from __future__ import annotations

import torch
from torch import nn

from .discovery import _peft_classes
from .offload import read_disk_copy


_MISSING = object()
_CAST_HOOK = "layerwise_casting"  # diffusers' HookRegistry name of the enable_layerwise_casting hook


def _real_weight(linear: nn.Module, disk: dict | None = None) -> torch.Tensor:
    """``linear.weight``, or under accelerate's sequential offload (weights on meta) the offloaded copy,
    or under diffusers' disk group offloading (``disk``: :func:`.offload.disk_copies`) the stored one."""
    w = linear.weight
    if disk and id(w) in disk:
        stored = read_disk_copy(disk[id(w)], w)
        if stored is not None:
            return stored
    if w.is_meta:
        hook = getattr(linear, "_hf_hook", None)
        wmap = getattr(hook, "weights_map", None)
        if wmap is not None:
            try:
                return wmap["weight"]
            except (KeyError, TypeError):
                pass
    return w


def _scale_key(s):
    if isinstance(s, torch.Tensor):
        return (id(s), s._version)
    return s


def _compile_key(s):
    # under torch.compile tensor scalings are trusted as packed (no version check inside the graph)
    return "tensor" if isinstance(s, torch.Tensor) else s


def _weight_key(w: torch.Tensor):
    return (w._version, w.data_ptr(), w.dtype, w.device)


def _scales_key(m, s, t):
    sc = m.scaling
    return _scale_key(sc[s]), _scale_key(sc[t])


def _casts_to(base: nn.Module, dtype: torch.dtype) -> bool:
    """True when diffusers' layerwise casting hook casts ``base``'s weights to ``dtype`` for each call."""
    registry = getattr(base, "_diffusers_hook", None)
    hook = getattr(registry, "hooks", {}).get(_CAST_HOOK) if registry is not None else None
    return hook is not None and getattr(hook, "compute_dtype", None) == dtype


def _diffusers_slot(m: nn.Module):
    """``(fn_ref, attribute)`` holding the innermost forward of diffusers' hook chain on layer ``m``
    (``enable_layerwise_casting`` wraps PEFT layers in one) when that is still the layer's own class
    forward, else None."""
    registry = m.__dict__.get("_diffusers_hook")
    refs = getattr(registry, "_fn_refs", None)
    if not refs:
        return None
    ref = refs[0]
    attr = "original_forward" if getattr(ref, "original_forward", None) is not None else "forward"
    f = getattr(ref, attr, None)
    if getattr(f, "__func__", None) is type(m).forward and getattr(f, "__self__", None) is m:
        return ref, attr
    return None


def _flat_conv_lora(m, a):
    """Adapter ``a`` of conv LoRA layer ``m`` as a linear one: (A (r, C_in kh kw), B (C_out, r), scale),
    dW = scale B A the conv kernel flattened; None when B is not a 1x1 kernel (no such factorization)."""
    A, B = _real_weight(m.lora_A[a]), _real_weight(m.lora_B[a])
    if B.dim() > 2 and any(k != 1 for k in B.shape[2:]):
        return None
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), m.scaling[a]


def activate_adapters(denoisers, names: tuple[str, str]) -> list[tuple[nn.Module, object, list[str]]]:
    """Make exactly ``[subject, style]`` active on every PEFT LoRA layer of ``denoisers`` (``(component,
    module)`` pairs) that holds either; returns (layer, saved ``_active_adapter``, the list we set) for
    :func:`restore_adapters`."""
    LoraLayer = _peft_classes()
    activated = []
    for _, d in denoisers:
        for _, mod in d.named_modules():
            if isinstance(mod, LoraLayer) and any(a in getattr(mod, "lora_A", {}) for a in names):
                if list(mod.active_adapters) != list(names):
                    ours = list(names)
                    saved = mod.__dict__.get("_active_adapter", _MISSING)
                    mod._active_adapter = ours
                    activated.append((mod, saved, ours))
    return activated


def restore_adapters(activated: list) -> None:
    """Undo :func:`activate_adapters` (a layer whose active adapters someone set since is left alone)."""
    for m, saved, ours in activated:
        if m.__dict__.get("_active_adapter") is ours:
            if saved is _MISSING:
                del m.__dict__["_active_adapter"]
            else:
                m._active_adapter = saved
    activated.clear()


def unhook_diffusers(hook_slots: list, forwards: list) -> None:
    """Take our forwards out of diffusers' hook chains: from ``hook_slots`` (fn ref, attribute, saved,
    ours), where an installation put them, and where a hook added after installation
    (``enable_layerwise_casting``) wrapped a patched layer's ``(layer, our forward)``."""
    for ref, attr, saved, ours in hook_slots:
        if getattr(ref, attr, None) is ours:
            setattr(ref, attr, saved)
    hook_slots.clear()
    for m, fwd in forwards:
        registry = m.__dict__.get("_diffusers_hook")
        for ref in getattr(registry, "_fn_refs", None) or ():
            for attr in ("original_forward", "forward"):
                if fwd is not None and getattr(ref, attr, None) is fwd:
                    setattr(ref, attr, type(m).forward.__get__(m))
