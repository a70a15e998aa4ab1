"""Integrations with diffusers pipelines, PEFT layers and LoRA files.

diffusers and PEFT are imported lazily (inside the functions), so importing lorafuse needs neither.
"""

from .diffusers import FusionFallbackWarning, FusionHandle, accelerate_fusion, remove_fusion
from .lora_files import LoRAAlphaWarning, LoRAPair, fix_peft_alphas, load_lora_layers, load_lora_pair
from .module import ModuleFusion, fuse_module, fuse_modules

__all__ = [
    "FusionFallbackWarning", "FusionHandle", "LoRAAlphaWarning", "LoRAPair", "ModuleFusion", "accelerate_fusion",
    "fix_peft_alphas", "fuse_module", "fuse_modules", "load_lora_layers", "load_lora_pair", "remove_fusion",
]
