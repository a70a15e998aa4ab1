"""Image scorers: differentiable ``images -> embeddings`` callables for the guidance and the EST probe.

The interface is any callable taking a float batch ``(B, 3, H, W)`` with values in [0, 1] and
returning a ``(B, D)`` tensor, differentiable in the images. :class:`ImageScorer` adapts a
``transformers`` vision model: resize (shorter side to ``resize_to``, bilinear with antialiasing,
differentiable) and center crop to ``image_size``, normalise with the model's mean/std, run the model
and pick the embedding:

- :class:`CLIPScorer`: ``CLIPVisionModelWithProjection`` -> ``image_embeds`` (the projected CLIP
  image embedding; the paper's style metric is CLIP image-image cosine).
- :class:`DINOScorer`: ``ViTModel`` (DINO v1, e.g. ``facebook/dino-vits16``) or ``Dinov2Model`` ->
  the last layer's CLS token (EST-LoRA's probe: "last-layer CLS token").

``from_pretrained(path)`` loads from a *local folder* only (``local_files_only=True``; a path that is
not a folder raises FileNotFoundError): lorafuse never downloads weights. ``tiny(...)`` builds a
random-init model from a small config for tests.

Reference images of another size than the model's input are **resized** by the scorer (the same
preprocessing as the generated images). With ``resize=False`` a size mismatch raises
:class:`~lorafuse.guidance.config.GuidanceError` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import GuidanceError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images, who: str = "images") -> torch.Tensor:
    """``images`` as a float batch (B, 3, H, W) in [0, 1]: accepts (3, H, W), uint8 in [0, 255] and a
    PIL image; anything else raises :class:`GuidanceError` saying what was wrong."""
    if not isinstance(images, torch.Tensor):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        if Image is not None and isinstance(images, Image.Image):
            import numpy as np

            arr = np.asarray(images.convert("RGB"))
            images = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        else:
            raise GuidanceError(f"{who}: expected a tensor (B, 3, H, W) / (3, H, W) or a PIL image, "
                                f"got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise GuidanceError(f"{who}: expected shape (B, 3, H, W) or (3, H, W) (RGB, channels first), "
                            f"got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise GuidanceError(f"{who}: empty image batch {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise GuidanceError(f"{who}: expected float in [0, 1] or uint8, got dtype {images.dtype}")
    return images


def check_range(images: torch.Tensor, who: str, tol: float = 1e-3) -> None:
    """Reference images must lie in [0, 1] (a host sync: used on references only, once)."""
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= -tol and hi <= 1.0 + tol):
        hint = " (looks like 0-255 values: divide by 255)" if hi > 2 else " (looks like [-1, 1]: use x / 2 + 0.5)" if lo < 0 else ""
        raise GuidanceError(f"{who}: values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")


def check_embeddings(emb, batch: int, who: str) -> torch.Tensor:
    """A scorer's output must be a finite (batch, D) tensor."""
    if not isinstance(emb, torch.Tensor):
        raise GuidanceError(f"{who} returned {type(emb).__name__}; a scorer must return a (B, D) tensor")
    if emb.ndim != 2 or emb.shape[0] != batch or emb.shape[1] < 1:
        raise GuidanceError(f"{who} returned shape {tuple(emb.shape)} for {batch} image(s); a scorer must return "
                            f"({batch}, D) embeddings")
    if not emb.is_floating_point():
        raise GuidanceError(f"{who} returned dtype {emb.dtype}; expected floating-point embeddings")
    if not bool(torch.isfinite(emb).all()):
        raise GuidanceError(f"{who} returned non-finite values (NaN or inf) for {batch} image(s)")
    return emb


def _local_dir(path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"scorer path {str(path)!r} is not a local folder; lorafuse never downloads scorer weights: pass a folder "
            "holding config.json and the weights (e.g. written by save_pretrained or a hub snapshot)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"scorer folder {str(p)!r} has no config.json")
    return p


def _read_preprocessor(p: Path) -> dict:
    f = p / "preprocessor_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    if cfg.get("image_mean") is not None:
        out["mean"] = tuple(float(v) for v in cfg["image_mean"])
    if cfg.get("image_std") is not None:
        out["std"] = tuple(float(v) for v in cfg["image_std"])

    def edge(v):
        if isinstance(v, (int, float)):
            return int(v)
        if isinstance(v, dict):
            for k in ("shortest_edge", "height"):
                if v.get(k):
                    return int(v[k])
        return None

    crop = edge(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    size = edge(cfg.get("size"))
    if crop:
        out["image_size"] = crop
        if size:
            out["resize_to"] = size
    elif size:
        out["image_size"] = size
    return out


class ImageScorer(nn.Module):
    """A frozen vision model as a differentiable ``images (B, 3, H, W) in [0, 1] -> (B, D)`` scorer.

    Args:
        model: a ``transformers`` vision model called as ``model(pixel_values=x)``.
        image_size: the model's input side (center crop). resize_to: shorter side before the crop
            (default image_size). mean, std: normalisation. embedding: "image_embeds" (projected
            CLIP), "cls" (last_hidden_state[:, 0]) or "pooler" (pooler_output).
        resize: resize inputs of another size (default True); False raises GuidanceError instead.
    """

    def __init__(self, model: nn.Module, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                 embedding: str = "cls", resize_to: Optional[int] = None, resize: bool = True, name: str = "scorer"):
        super().__init__()
        if embedding not in ("image_embeds", "cls", "pooler"):
            raise ValueError(f"ImageScorer: embedding must be 'image_embeds', 'cls' or 'pooler', got {embedding!r}")
        self.model = model.eval()
        self.model.requires_grad_(False)  # gradients flow to the images only
        self.image_size = int(image_size)
        self.resize_to = int(resize_to or image_size)
        if self.resize_to < self.image_size:
            raise ValueError(f"ImageScorer: resize_to ({self.resize_to}) must be >= image_size ({self.image_size})")
        self.embedding = embedding
        self.resize = bool(resize)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images, f"{self.name}: images")
        images = images.to(device=self.device, dtype=self.dtype)
        h, w = images.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s) or self.resize_to != s:
            if not self.resize:
                raise GuidanceError(f"{self.name}: images are {h}x{w}, the scorer takes {s}x{s} and resize=False "
                                    "(resize the images, or build the scorer with resize=True)")
            r = self.resize_to
            nh, nw = (r, max(r, round(w * r / h))) if h <= w else (max(r, round(h * r / w)), r)
            if (nh, nw) != (h, w):
                images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False,
                                       antialias=(nh < h or nw < w))
            top, left = (nh - s) // 2, (nw - s) // 2
            images = images[..., top:top + s, left:left + s]
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(images))
        if self.embedding == "image_embeds":
            return out.image_embeds
        if self.embedding == "pooler":
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, resize_to={self.resize_to}, embedding={self.embedding!r}"


class CLIPScorer(ImageScorer):
    """CLIP image embeddings (projected, ``image_embeds``) of a ``CLIPVisionModelWithProjection``."""

    def __init__(self, model, *, image_size=None, mean=CLIP_MEAN, std=CLIP_STD, resize_to=None, resize=True):
        super().__init__(model, image_size=image_size or model.config.image_size, mean=mean, std=std,
                         embedding="image_embeds", resize_to=resize_to, resize=resize, name="CLIPScorer")

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.float32, device=None, resize=True) -> "CLIPScorer":
        """Load from a local folder (a ``CLIPVisionModelWithProjection`` or full ``CLIPModel`` save;
        preprocessing from its ``preprocessor_config.json`` when present). Never downloads."""
        from transformers import CLIPVisionModelWithProjection

        from ..integrations.compat import transformers_dtype_kwargs

        p = _local_dir(path)
        model = CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True,
                                                              **transformers_dtype_kwargs(dtype))
        pre = _read_preprocessor(p)
        scorer = cls(model, image_size=pre.get("image_size"), mean=pre.get("mean", CLIP_MEAN),
                     std=pre.get("std", CLIP_STD), resize_to=pre.get("resize_to"), resize=resize)
        return scorer.to(device) if device is not None else scorer

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32, hidden: int = 32, layers: int = 2, patch: int = 8,
             projection_dim: int = 16) -> "CLIPScorer":
        """Random-init tiny CLIP vision tower (tests, benchmarks)."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=4, image_size=image_size, patch_size=patch,
                               projection_dim=projection_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModelWithProjection(cfg)
        return cls(model)


class DINOScorer(ImageScorer):
    """DINO / ViT CLS embeddings (``ViTModel``, ``Dinov2Model``): last layer's CLS token."""

    def __init__(self, model, *, image_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_to=None, resize=True,
                 embedding: str = "cls"):
        super().__init__(model, image_size=image_size or model.config.image_size, mean=mean, std=std,
                         embedding=embedding, resize_to=resize_to, resize=resize, name="DINOScorer")

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.float32, device=None, resize=True, image_size=None,
                        resize_to=None) -> "DINOScorer":
        """Load a ViT/DINO/DINOv2 model (``AutoModel``) from a local folder. Never downloads.
        Preprocessing from ``preprocessor_config.json`` when present (DINOv2: resize 256, crop 224);
        ``image_size``/``resize_to`` override it (EST's evaluation: resize 256, crop 224)."""
        from transformers import AutoModel

        from ..integrations.compat import transformers_dtype_kwargs

        p = _local_dir(path)
        model = AutoModel.from_pretrained(str(p), local_files_only=True, **transformers_dtype_kwargs(dtype))
        if not hasattr(model.config, "image_size"):
            raise GuidanceError(f"DINOScorer: {str(p)!r} holds a {type(model).__name__}, not a vision transformer")
        pre = _read_preprocessor(p)
        scorer = cls(model, image_size=image_size or pre.get("image_size"), mean=pre.get("mean", IMAGENET_MEAN),
                     std=pre.get("std", IMAGENET_STD), resize_to=resize_to or pre.get("resize_to"), resize=resize)
        return scorer.to(device) if device is not None else scorer

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32, hidden: int = 32, layers: int = 2, patch: int = 8,
             arch: str = "vit") -> "DINOScorer":
        """Random-init tiny ViT (``arch="vit"``, DINO v1 layout) or DINOv2 (``"dinov2"``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if arch == "vit":
                from transformers import ViTConfig, ViTModel

                model = ViTModel(ViTConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                           num_attention_heads=4, image_size=image_size, patch_size=patch),
                                 add_pooling_layer=False)
            elif arch == "dinov2":
                from transformers import Dinov2Config, Dinov2Model

                model = Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                                 image_size=image_size, patch_size=patch, mlp_ratio=2))
            else:
                raise ValueError(f"DINOScorer.tiny: arch must be 'vit' or 'dinov2', got {arch!r}")
        return cls(model)


def load_scorer(path, **kwargs) -> ImageScorer:
    """A scorer from a local folder, by its config's ``model_type``: CLIP -> :class:`CLIPScorer`,
    ViT / DINOv2 -> :class:`DINOScorer`. Never downloads."""
    p = _local_dir(path)
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError) as e:
        raise GuidanceError(f"load_scorer: cannot read {p / 'config.json'}: {e}") from e
    if model_type.startswith("clip"):
        return CLIPScorer.from_pretrained(p, **kwargs)
    if model_type in ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "deit"):
        return DINOScorer.from_pretrained(p, **kwargs)
    raise GuidanceError(f"load_scorer: unsupported model_type {model_type!r} in {p}; use CLIPScorer / DINOScorer "
                        "or any callable images -> (B, D) embeddings")
