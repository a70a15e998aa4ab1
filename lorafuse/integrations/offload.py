"""Offloading (diffusers group offloading, accelerate model / sequential offload) and the patched layers.

Three things the fused / merged paths need to know about weights that an offloading hook moves:

- **own hooks** (:func:`has_own_offload_hook`): with ``enable_group_offload(offload_type="leaf_level")``
  every leaf module (a PEFT layer's ``base_layer``, ``lora_A[name]``, ``lora_B[name]``) onloads its
  own weights in its own forward. The fused / merged paths never call those forwards, so such a layer
  runs PEFT's forward (which fires the hooks), driven with the method's gates.
- **disk copies** (:func:`disk_copies`): with ``offload_to_disk_path`` an offloaded tensor is an
  uninitialised placeholder and its value lives in the group's safetensors file; a method that
  prepares its statistics while the denoiser is offloaded reads the LoRA factors from there.
- **snapshots** (:func:`watch_offload`): enabling offloading copies the weights as they are (accelerate's
  ``weights_map``, the group-offload file, pinned host copies). In ``weights="inplace"`` mode a patched
  weight holds ``W + dW`` between calls, so the patched layers hand their original weights back just
  before ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` / ``enable_group_offload`` /
  ``enable_layerwise_casting`` run (on the pipeline or a denoiser); the next call merges again.

diffusers is not imported here: hooks are found through the attributes diffusers sets.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

OFFLOAD_METHODS = ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload",
                   "enable_layerwise_casting")
_GROUP_OFFLOADING = "group_offloading"  # diffusers.hooks.group_offloading._GROUP_OFFLOADING


def _group_hook(module: nn.Module):
    registry = module.__dict__.get("_diffusers_hook")
    return registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None


def has_own_offload_hook(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` onloads its weights in its own forward (leaf-level group offloading)."""
    return any(_group_hook(m) is not None for m in modules)


def ancestors(root: nn.Module, path: str) -> tuple[nn.Module, ...]:
    """The modules from ``root`` down to (not including) the one at dotted ``path``."""
    out, m = [], root
    for name in path.split(".")[:-1]:
        out.append(m)
        m = m.get_submodule(name)
    out.append(m)
    return tuple(out)


def group_offloaded(modules) -> bool:
    """Whether diffusers' group offloading moves the weights of a module below any of ``modules``
    (block level: between two calls of its block they may be placeholders)."""
    return any(_group_hook(m) is not None for m in modules)


def disk_copies(models) -> dict[int, tuple[str, str]]:
    """{id(tensor): (safetensors file, key)} of every tensor of ``models`` that diffusers' group
    offloading keeps on disk (``offload_to_disk_path``) and has offloaded at least once."""
    out: dict[int, tuple[str, str]] = {}
    for model in models:
        for m in model.modules():
            group = getattr(_group_hook(m), "group", None)
            if group is None or not getattr(group, "offload_to_disk_path", None):
                continue
            if not getattr(group, "_is_offloaded_to_disk", False):
                continue
            for tensor, key in getattr(group, "tensor_to_key", {}).items():
                out[id(tensor)] = (group.safetensors_file_path, key)
    return out


def read_disk_copy(where: tuple[str, str], like: torch.Tensor) -> torch.Tensor | None:
    """The stored value of one disk-offloaded tensor (on the CPU), or None when the file lacks it."""
    from safetensors import safe_open

    path, key = where
    with safe_open(path, framework="pt", device="cpu") as f:
        if key not in f.keys():
            return None
        value = f.get_tensor(key)
    return value if value.shape == like.shape else None


def watch_offload(objects, hand_back: Callable[[], None]) -> list[tuple[Any, str, Callable]]:
    """Wrap :data:`OFFLOAD_METHODS` of each object (a pipeline, a denoiser) that has them so that
    ``hand_back()`` runs first; returns (object, name, wrapper) for :func:`unwatch`."""
    watches = []
    for obj in objects:
        for name in OFFLOAD_METHODS:
            cls_fn = getattr(type(obj), name, None)
            if cls_fn is None or name in vars(obj):
                continue

            def wrapper(*args, _obj=obj, _fn=cls_fn, **kwargs):
                hand_back()
                return _fn(_obj, *args, **kwargs)

            functools.update_wrapper(wrapper, cls_fn)
            setattr(obj, name, wrapper)  # an instance attribute (nn.Module keeps functions in __dict__)
            watches.append((obj, name, wrapper))
    return watches


def unwatch(watches) -> None:
    """Undo :func:`watch_offload` (a wrapper someone replaced since is left alone)."""
    for obj, name, wrapper in watches:
        if vars(obj).get(name) is wrapper:
            del vars(obj)[name]
    watches.clear()
