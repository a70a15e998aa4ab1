"""Where accelerate_fusion acts: a pipeline's denoisers and their PEFT LoRA layers.

A denoiser is the pipeline component the sampler calls once per step (``unet``, ``transformer``,
...); the patched layers are its PEFT LoRA layers of linear kind that hold both fused adapters, in
execution order; the other LoRA layers of the two adapters (conv, single-adapter) are reported.
"""

from __future__ import annotations

from torch import nn


# the pipeline attributes that may hold a denoiser (lorafuse.guidance reads them too)
DENOISER_NAMES = ("unet", "transformer", "transformer_2", "prior", "decoder")


def _peft_classes():
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError("lorafuse.accelerate_fusion needs `peft` (pip install peft)") from e
    return LoraLayer


def _find_denoisers(pipe) -> list[tuple[str, nn.Module]]:
    if isinstance(pipe, nn.Module):
        if getattr(pipe, "peft_config", None) is not None or any(
            True for _ in _lora_layers(pipe, names=None, limit=1)
        ):
            return [(type(pipe).__name__, pipe)]
        raise ValueError(
            f"accelerate_fusion: {type(pipe).__name__} carries no PEFT LoRA adapters; load two with "
            "pipe.load_lora_weights(..., adapter_name=...) first"
        )
    found = []
    for name in DENOISER_NAMES:
        mod = getattr(pipe, name, None)
        if isinstance(mod, nn.Module):
            found.append((name, mod))
    if not found:
        raise ValueError(
            f"accelerate_fusion: {type(pipe).__name__} has no supported denoiser (looked for the components "
            f"{', '.join(DENOISER_NAMES[:2])}); pass a diffusers pipeline with a UNet or a transformer"
        )
    return found


def _lora_layers(model: nn.Module, names, limit=None):
    """Yield (path, module) for PEFT LoRA layers of Linear kind (lora_A[a] is an nn.Linear)."""
    LoraLayer = _peft_classes()
    n = 0
    for path, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        lora_a = getattr(mod, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or len(lora_a) == 0:
            continue
        if names is not None and not all(a in lora_a for a in names):
            continue
        if not all(isinstance(lora_a[a], nn.Linear) for a in (names or list(lora_a.keys()))):
            continue  # conv LoRAs (kohya conv_dim) stay on PEFT
        yield path, mod
        n += 1
        if limit is not None and n >= limit:
            return


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile``-d wrapper (``OptimizedModule``) compiles, else the module."""
    return getattr(module, "_orig_mod", module) if isinstance(module, nn.Module) else module


def _adapter_layers(model: nn.Module, names):
    """(path, module) of every PEFT LoRA layer (linear or conv) that holds any of ``names``."""
    LoraLayer = _peft_classes()
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and any(a in (getattr(mod, "lora_A", None) or {}) for a in names):
            yield path, mod


def _why_unpatched(mod, s: str, t: str) -> str:
    lora_a = mod.lora_A
    if s not in lora_a or t not in lora_a:
        return f"only the {'subject' if s in lora_a else 'style'} adapter targets it"
    return "not a linear LoRA (conv)"


def _execution_rank(path: str, denoiser: nn.Module) -> int:
    """UNets register up_blocks before mid_block but run down -> mid -> up: order layers as they run
    (the official counter mode's per-layer sub-step offset depends on the execution order)."""
    first = path.split(".", 1)[0]
    if type(denoiser).__name__.startswith("UNet"):
        return {"down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_out": 4}.get(first, 0)
    return 0


def plan_layers(denoisers, names: tuple[str, str]):
    """What an installation of adapters ``names = (subject, style)`` patches in ``denoisers``
    (``(component, module)`` pairs): ``(patched, unpatched)`` with ``patched`` the ``(component,
    path, layer)`` of every linear LoRA layer holding both, in execution order, and ``unpatched``
    the ``(component.path, layer, why)`` of the two adapters' other LoRA layers. ValueError when
    nothing is common, or when the adapters are fused into the weights (``pipe.fuse_lora()``)."""
    s, t = names
    entries = []
    for comp, d in denoisers:
        d = _unwrap(d)  # compiled before accelerate_fusion: patch the compiled module's layers
        for path, mod in _lora_layers(d, (s, t)):
            entries.append((_execution_rank(path, d), len(entries), comp, path, mod))
    if not entries:
        raise ValueError(
            f"accelerate_fusion: the adapters {s!r} and {t!r} target no common linear layer in "
            f"{', '.join(c for c, _ in denoisers)}; nothing to fuse"
        )
    entries.sort(key=lambda e: (e[0], e[1]))
    fused = [f"{comp}.{path}" for _, _, comp, path, mod in entries if set(mod.merged_adapters) & {s, t}]
    if fused:
        raise ValueError(
            f"accelerate_fusion: the adapters are fused into the weights of {len(fused)} layers (first: {fused[0]}; "
            "pipe.fuse_lora()): the method cannot select between them; call pipe.unfuse_lora() first"
        )
    patched = {id(e[4]) for e in entries}
    unpatched = [(f"{comp}.{path}", mod, _why_unpatched(mod, s, t))
                 for comp, d in denoisers for path, mod in _adapter_layers(_unwrap(d), (s, t)) if id(mod) not in patched]
    return [(comp, path, mod) for _, _, comp, path, mod in entries], unpatched
