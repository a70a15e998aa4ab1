"""lorafuse: fused Triton kernels for training-free subject + style LoRA fusion in diffusion models."""

from .integrations import FusionFallbackWarning, FusionHandle, accelerate_fusion, remove_fusion
from .integrations.module import fuse_module, fuse_modules
from .kernels import LoRAStats, PackedLoRA, fused_lora_forward, fused_lora_linear

__version__ = "0.1.0"

__all__ = [
    "FusionFallbackWarning", "FusionHandle", "LoRAStats", "PackedLoRA", "accelerate_fusion", "fuse_module",
    "fuse_modules", "fused_lora_forward", "fused_lora_linear", "remove_fusion", "__version__",
]
