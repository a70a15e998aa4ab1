"""Integrations with diffusers pipelines, PEFT layers and LoRA files.

diffusers and PEFT are imported lazily (inside the functions), so importing lorafuse needs neither.
"""

from .diffusers import FusionFallbackWarning, FusionHandle, accelerate_fusion, remove_fusion

__all__ = ["FusionFallbackWarning", "FusionHandle", "accelerate_fusion", "remove_fusion"]
