"""Metric-guided latent refinement (Cao et al.'s latent-level refinement) and EST-LoRA's style
discrepancy probe, with pluggable image scorers.

    from lorafuse.guidance import GuidanceConfig, CLIPScorer, DINOScorer
    cfg = GuidanceConfig(subject_scorer=DINOScorer.from_pretrained("/models/dino-vits16"), subject_images=refs,
                         style_scorer=CLIPScorer.from_pretrained("/models/clip-vit-b32"), style_images=style_ref)
    handle = lorafuse.accelerate_fusion(pipe, "sbj", "sty", method="kl", guidance=cfg)   # or enable_guidance(pipe, cfg)

transformers and diffusers are imported lazily (inside functions); importing this package needs
torch and triton (it sits above :mod:`lorafuse.integrations`, whose ``register_guidance`` lets
``accelerate_fusion(guidance=...)`` install a :class:`GuidanceConfig`).
"""

from .config import GuidanceConfig, GuidanceError
from .est import (StyleProbe, clear_style_discrepancy_cache, probe_images, style_discrepancy,
                  style_discrepancy_cache_info)
from .hook import GuidanceHandle, active_guidance, enable_guidance, remove_guidance
from .refine import LatentRefiner, predict_x0, scheduler_kind
from .scorers import CLIPScorer, DINOScorer, ImageScorer, load_scorer

__all__ = [
    "CLIPScorer", "DINOScorer", "GuidanceConfig", "GuidanceError", "GuidanceHandle", "ImageScorer", "LatentRefiner",
    "StyleProbe", "active_guidance", "clear_style_discrepancy_cache", "enable_guidance", "load_scorer",
    "predict_x0", "probe_images", "remove_guidance", "scheduler_kind", "style_discrepancy",
    "style_discrepancy_cache_info",
]
