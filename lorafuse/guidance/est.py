"""EST-LoRA's style discrepancy probe (research/algorithms.md 2(a)):

    I_c = generate(prompt, subject LoRA only, seed)      I_s = generate(prompt, style LoRA only, seed)
    D   = 1 - cos(DINO(I_c), DINO(I_s))                   in [0, 2]

The two probes run through lorafuse's fused path (``accelerate_fusion(pipe, subject, style,
method="subject")`` then ``"style"``: gates (1, 0) and (0, 1) over the two loaded adapters, one
handle per probe, removed afterwards), not through two extra pipelines as the official code does.
Text encoders run as the user set them (the fused path covers the denoiser only).

Results are cached per pipeline (weakly: the cache dies with the pipeline) under the key
(subject name, style name, a content fingerprint of both adapters' LoRA weights, prompt, seed,
scorer object, the other generation kwargs), so reloading different weights under the same names
recomputes. ``num_images_per_prompt > 1`` gives the mean of the per-image D.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..integrations import accelerate_fusion, installed_fusion
from ..integrations.discovery import DENOISER_NAMES
from .config import GuidanceError
from .hook import active_guidance
from .scorers import check_embeddings, check_images

_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_STATS = {"hits": 0, "misses": 0}


@dataclass(frozen=True)
class StyleProbe:
    """D with the two probe images (B, 3, H, W) in [0, 1] and their embeddings."""

    D: float
    subject_image: torch.Tensor
    style_image: torch.Tensor
    subject_embedding: torch.Tensor
    style_embedding: torch.Tensor


def _denoisers(pipe):
    return [getattr(pipe, n) for n in DENOISER_NAMES if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def _fingerprint(pipe, adapter: str) -> tuple:
    """Content digest of one adapter's LoRA weights in the denoiser(s): (count, sum, sum of squares)."""
    n, s1, s2 = 0, 0.0, 0.0
    with torch.no_grad():
        for d in _denoisers(pipe):
            for name, p in d.named_parameters():
                if f".{adapter}." in name and ("lora_A" in name or "lora_B" in name):
                    x = p.detach().double()
                    n += 1
                    s1 += float(x.sum())
                    s2 += float((x * x).sum())
    if n == 0:
        raise GuidanceError(f"style_discrepancy: adapter {adapter!r} has no LoRA weights in the denoiser")
    return (n, round(s1, 9), round(s2, 9))


def _freeze(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype), float(v.double().sum()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _scorer_ref(scorer):
    """(identity key, weak reference) of a scorer; bound methods by (object, function)."""
    import inspect

    if inspect.ismethod(scorer):
        return (id(scorer.__self__), id(scorer.__func__)), weakref.WeakMethod(scorer)
    try:
        return id(scorer), weakref.ref(scorer)
    except TypeError:  # not weak-referenceable: keep it alive with the cache entry
        return id(scorer), (lambda s=scorer: s)


def _check_clear(pipe) -> None:
    for d in _denoisers(pipe):
        if installed_fusion(d) is not None:
            raise GuidanceError("style_discrepancy: a lorafuse fusion is installed on this pipeline; compute D "
                                "first (it installs its own probe handles), then call accelerate_fusion")
    if active_guidance(pipe) is not None:
        raise GuidanceError("style_discrepancy: latent guidance is installed on this pipeline; remove it first "
                            "(the probes are plain generations)")


def probe_images(pipe, prompt, subject: str, style: str, seed: int = 0, **pipe_kwargs):
    """The two probe generations: ``(I_subject, I_style)``, each (B, 3, H, W) in [0, 1].

    Each runs ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
    **pipe_kwargs)`` under ``accelerate_fusion(pipe, subject, style, method="subject"|"style")``;
    the handle is removed afterwards (also on error). A CPU generator makes the probe identical on
    any device."""
    _check_clear(pipe)
    if "generator" in pipe_kwargs or "output_type" in pipe_kwargs:
        raise GuidanceError("style_discrepancy: the probe sets generator (from seed) and output_type itself")
    images = []
    for role in ("subject", "style"):
        handle = accelerate_fusion(pipe, subject, style, method=role, log_gates=False)
        try:
            with torch.no_grad():
                out = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pt",
                           **pipe_kwargs)
        finally:
            handle.remove()
        img = out.images if hasattr(out, "images") else out[0]
        images.append(check_images(img, f"style_discrepancy: {role} probe image").detach())
    return images[0], images[1]


def discrepancy(emb_subject: torch.Tensor, emb_style: torch.Tensor) -> float:
    """``1 - cos`` averaged over the batch, clamped to [0, 2] (rounding only)."""
    cos = torch.nn.functional.cosine_similarity(emb_subject.double(), emb_style.double(), dim=-1)
    return float((1.0 - cos).mean().clamp(0.0, 2.0))


def style_discrepancy(pipe, prompt, subject: str, style: str, scorer, seed: int = 0, *, cache: bool = True,
                      return_probe: bool = False, **pipe_kwargs):
    """EST-LoRA's D = 1 - cos(scorer(I_subject), scorer(I_style)) from two probe generations.

    Args:
        pipe: a diffusers pipeline with both adapters loaded (``pipe.load_lora_weights(...,
            adapter_name=...)``) and no lorafuse fusion or guidance installed.
        prompt: the generation prompt (or pass ``prompt_embeds`` etc. in ``pipe_kwargs`` and None).
        subject, style: adapter names. scorer: images (B, 3, H, W) in [0, 1] -> (B, D); EST uses
            DINO ViT-S/16's CLS token (:class:`~lorafuse.guidance.DINOScorer`).
        seed: the probe's seed (EST: 0). cache: reuse a result computed with the same key.
        return_probe: return a :class:`StyleProbe` (D, images, embeddings) instead of the float.
        **pipe_kwargs: passed to the pipeline (num_inference_steps, height, width, guidance_scale...).

    Returns D (float in [0, 2]) or a :class:`StyleProbe`.
    """
    if not callable(scorer):
        raise GuidanceError("style_discrepancy: scorer must be callable (images -> (B, D) embeddings)")
    skey, sref = _scorer_ref(scorer)
    key = (subject, style, _fingerprint(pipe, subject), _fingerprint(pipe, style), _freeze(prompt), int(seed),
           skey, _freeze(pipe_kwargs))
    per_pipe = _CACHE.get(pipe)
    if cache and per_pipe is not None and key in per_pipe:
        entry = per_pipe[key]
        if entry[0]() == scorer:  # the scorer object is alive and the same one (not a reused id)
            _STATS["hits"] += 1
            return entry[1] if return_probe else entry[1].D
    _STATS["misses"] += 1
    img_c, img_s = probe_images(pipe, prompt, subject, style, seed, **pipe_kwargs)
    with torch.no_grad():
        e_c = check_embeddings(scorer(img_c), img_c.shape[0], "style_discrepancy: scorer")
        e_s = check_embeddings(scorer(img_s), img_s.shape[0], "style_discrepancy: scorer")
    if e_c.shape != e_s.shape:
        raise GuidanceError(f"style_discrepancy: scorer returned {tuple(e_c.shape)} and {tuple(e_s.shape)}")
    probe = StyleProbe(discrepancy(e_c, e_s), img_c, img_s, e_c.detach(), e_s.detach())
    if cache:
        _CACHE.setdefault(pipe, {})[key] = (sref, probe)
    return probe if return_probe else probe.D


def clear_style_discrepancy_cache() -> None:
    """Forget every cached D (and reset the hit/miss counters)."""
    _CACHE.clear()
    _STATS.update(hits=0, misses=0)


def style_discrepancy_cache_info() -> dict:
    """{"hits", "misses", "entries"} of the D cache."""
    return {"hits": _STATS["hits"], "misses": _STATS["misses"], "entries": sum(len(v) for v in _CACHE.values())}
