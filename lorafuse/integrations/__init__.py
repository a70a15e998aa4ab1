"""Integrations with diffusers pipelines, PEFT layers and LoRA files.

diffusers and PEFT are imported lazily (inside the functions), so importing lorafuse needs neither.
"""

from .diffusers import (FusionFallbackWarning, FusionHandle, accelerate_fusion, installed_fusion, register_guidance,
                        remove_fusion)
from .lora_files import LoRAAlphaWarning, LoRAPair, fix_peft_alphas, load_lora_layers, load_lora_pair
from ..engine.module import ModuleFusion, fuse_module, fuse_modules

__all__ = [
    "FusionFallbackWarning", "FusionHandle", "LoRAAlphaWarning", "LoRAPair", "ModuleFusion", "accelerate_fusion",
    "fix_peft_alphas", "fuse_module", "fuse_modules", "installed_fusion", "load_lora_layers", "load_lora_pair",
    "register_guidance", "remove_fusion",
]
