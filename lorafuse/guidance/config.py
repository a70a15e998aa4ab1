"""Options of the latent refinement (Cao et al., arXiv 2602.15539, "latent-level refinement").

The paper's update formula, step size, step schedule, the meaning of its trade-off parameter ``m``
and where the gradient flows are not public (research/algorithms.md section 3): each is an option
here, with the default and the reason in the field's comment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional


class GuidanceError(ValueError):
    """A guidance input is unusable: a scorer's output (wrong shape, non-finite), reference images
    (wrong layout or value range), or the pipeline (no VAE, no supported scheduler)."""


GRAD_THROUGH = ("vae", "denoiser")
NORMALIZE = ("rms", "none")


@dataclass
class GuidanceConfig:
    """What to score and how to move the latent.

    Loss per sample (cosines between scorer embeddings, references embedded once):

        L = subject_weight * (1 - mean_r cos(subject_scorer(img), subject_scorer(ref_r)))
          + style_weight   * (1 - mean_r cos(style_scorer(img),   style_scorer(style_r)))

    with ``img`` = VAE decode of the predicted x0, in [0, 1] (not clamped, so the gradient does not
    vanish on saturated pixels). A guided step replaces the latent z_t by ``z_t - eta * g`` before
    the scheduler step, where g = dL/dz_t, divided by its per-sample RMS when ``normalize="rms"``.

    Args:
        subject_scorer, subject_images: the subject term (the paper: DINO against the subject's
            reference images). Either both or neither. References: a (B, 3, H, W) or (3, H, W)
            tensor in [0, 1] (uint8 0-255 accepted), a PIL image, or a list of those; any size: the
            scorer resizes them like the generated images (``ImageScorer(resize=False)`` raises instead).
        style_scorer, style_images: the style term (the paper: CLIP against the style image).
        eta: step size. Default 0.05 with ``normalize="rms"``: each guided step moves each sample's
            latent by 5% of its unit RMS (the paper's value is not public).
        normalize: "rms" (default) divides the gradient by its per-sample RMS, so ``eta`` means the
            same for any resolution, VAE and scorer (the raw gradient's scale varies by orders of
            magnitude between them); "none" is the literal ``z - eta * grad``.
        subject_weight, style_weight: term weights (default 1 and 1).
        m: the paper's trade-off parameter (Table 5: larger m -> more style, less subject). Its
            definition is not public; here it is read as the style-to-subject weight ratio: when
            given it overrides the weights with (1, m). Default None (use the weights).
        every: guide every n-th step of the run (default 1: every step).
        start, end: the window of guided steps as fractions of the run: step i of N is guided when
            ``start <= i / N < end`` (default 0 and 1: the whole run).
        steps: explicit step indices to guide (overrides every/start/end).
        grad_through: "vae" (default): the noise prediction is held fixed and the gradient flows
            through the x0 formula, the VAE decoder and the scorers (cheap; the denoiser runs no
            backward). "denoiser": the denoiser is run again with autograd on the latent (its value
            is kept from the pipeline's own call, its gradient comes from the re-run: a
            straight-through estimate). Under a fusion handle the re-run takes PEFT's forward (both
            adapters at their set_adapters weights), so that gradient is the linear merge's.
            Needs one batched denoiser call per step (CFG batched as diffusers does).
        vae_slicing: decode, score and backpropagate one sample at a time, each graph freed before
            the next (default True: peak memory of one sample's graph).
        vae_tiling: None (default) leaves the VAE's own tiling setting; True/False sets it during
            the refinement only (large images).
        x0_fn: optional ``fn(scheduler, sample, model_output, timestep) -> x0`` replacing the
            built-in x0 prediction (VP / sigma / flow-matching schedulers are built in).
    """

    subject_scorer: Optional[Callable] = field(default=None, repr=False)
    subject_images: Any = field(default=None, repr=False)
    style_scorer: Optional[Callable] = field(default=None, repr=False)
    style_images: Any = field(default=None, repr=False)
    eta: float = 0.05
    normalize: str = "rms"
    subject_weight: float = 1.0
    style_weight: float = 1.0
    m: Optional[float] = None
    every: int = 1
    start: float = 0.0
    end: float = 1.0
    steps: Optional[Iterable[int]] = None
    grad_through: str = "vae"
    vae_slicing: bool = True
    vae_tiling: Optional[bool] = None
    x0_fn: Optional[Callable] = None
    _steps: Optional[frozenset] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("eta", "subject_weight", "style_weight", "start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GuidanceError(f"GuidanceConfig: {name} must be a finite number, got {v!r}")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, (int, float))
                                   or not math.isfinite(self.m) or self.m < 0):
            raise GuidanceError(f"GuidanceConfig: m must be a non-negative number or None, got {self.m!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise GuidanceError(f"GuidanceConfig: every must be a positive int, got {self.every!r}")
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise GuidanceError(f"GuidanceConfig: need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.grad_through not in GRAD_THROUGH:
            raise GuidanceError(f"GuidanceConfig: grad_through must be one of {GRAD_THROUGH}, got {self.grad_through!r}")
        if self.normalize not in NORMALIZE:
            raise GuidanceError(f"GuidanceConfig: normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        for role in ("subject", "style"):
            scorer, images = getattr(self, f"{role}_scorer"), getattr(self, f"{role}_images")
            if (scorer is None) != (images is None):
                raise GuidanceError(f"GuidanceConfig: give both {role}_scorer and {role}_images, or neither")
            if scorer is not None and not callable(scorer):
                raise GuidanceError(f"GuidanceConfig: {role}_scorer must be callable (images -> embeddings)")
        if self.subject_scorer is None and self.style_scorer is None:
            raise GuidanceError("GuidanceConfig: nothing to score; give subject_scorer/subject_images and/or "
                                "style_scorer/style_images")
        if self.steps is not None:
            steps = frozenset(int(s) for s in self.steps)
            if any(s < 0 for s in steps):
                raise GuidanceError(f"GuidanceConfig: steps must be non-negative indices, got {sorted(steps)}")
            self._steps = steps
        if self.x0_fn is not None and not callable(self.x0_fn):
            raise GuidanceError("GuidanceConfig: x0_fn must be callable")

    @property
    def weights(self) -> tuple[float, float]:
        """(subject, style) weights after applying ``m``; a term without a scorer weighs 0."""
        w_c, w_s = (1.0, float(self.m)) if self.m is not None else (float(self.subject_weight), float(self.style_weight))
        return (w_c if self.subject_scorer is not None else 0.0, w_s if self.style_scorer is not None else 0.0)

    def is_guided(self, step: int, num_steps: Optional[int]) -> bool:
        """Whether step ``step`` (0-based, of ``num_steps``) of a run is guided."""
        if self._steps is not None:
            return step in self._steps
        if step % self.every:
            return False
        if self.start == 0.0 and self.end == 1.0:
            return True
        if not num_steps:
            return False
        frac = step / num_steps
        return self.start <= frac < self.end
