"""lorafuse: fused Triton kernels for training-free subject + style LoRA fusion in diffusion models."""

from .kernels import LoRAStats, PackedLoRA, fused_lora_forward, fused_lora_linear

__version__ = "0.1.0"

__all__ = ["LoRAStats", "PackedLoRA", "fused_lora_forward", "fused_lora_linear", "__version__"]
