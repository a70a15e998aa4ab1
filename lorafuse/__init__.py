"""lorafuse: fused Triton kernels for training-free subject + style LoRA fusion in diffusion models.

The public names are imported on first use (PEP 562), so ``import lorafuse`` and the command line's
``--help`` do not pay for importing torch and triton."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FusionFallbackWarning": "lorafuse.integrations", "FusionHandle": "lorafuse.integrations",
    "accelerate_fusion": "lorafuse.integrations", "remove_fusion": "lorafuse.integrations",
    "fuse_module": "lorafuse.engine", "fuse_modules": "lorafuse.engine",
    "LoRAStats": "lorafuse.kernels", "PackedLoRA": "lorafuse.kernels", "fused_lora_forward": "lorafuse.kernels",
    "fused_lora_linear": "lorafuse.kernels",
}
_SUBPACKAGES = ("commands", "engine", "fusion", "guidance", "integrations", "kernels")

__all__ = [
    "FusionFallbackWarning", "FusionHandle", "LoRAStats", "PackedLoRA", "accelerate_fusion", "fuse_module",
    "fuse_modules", "fused_lora_forward", "fused_lora_linear", "remove_fusion", "__version__",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
