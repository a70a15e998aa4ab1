"""The latent refinement step (Cao et al.'s latent-level refinement; research/algorithms.md 3(a)):

    x0  = predicted clean latent from (z_t, model_output, t)   (VP: (z - sqrt(1-ab) eps)/sqrt(ab);
                                                                sigma: z - sigma eps; flow: z - sigma v)
    img = VAE.decode(x0 / scaling (+ shift)) / 2 + 1/2          (in [0, 1], not clamped)
    L   = w_c (1 - cos DINO(img, subject refs)) + w_s (1 - cos CLIP(img, style ref))
    z_t <- z_t - eta * dL/dz_t                                  (per-sample RMS-normalised by default)

:class:`LatentRefiner` holds the pipeline's VAE and scheduler, the scorers and the reference
embeddings (computed once, without a graph). Every refinement builds its graph under
``torch.enable_grad()``, takes ``torch.autograd.grad`` of the loss w.r.t. a detached copy of the
latent and returns a detached latent: nothing stays referenced after a step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch

from .config import GuidanceConfig, GuidanceError
from .scorers import check_embeddings, check_images, check_range

FLOW, SIGMA, VP = "flow", "sigma", "vp"


def scheduler_kind(scheduler) -> str:
    """How a scheduler parametrises the latent: "flow" (flow matching, z = (1-s) x0 + s n),
    "sigma" (k-diffusion / Euler: z = x0 + sigma eps, input scaled by 1/sqrt(sigma^2+1)) or "vp"
    (DDIM/DDPM/PNDM/DPM-Solver: z = sqrt(ab) x0 + sqrt(1-ab) eps)."""
    name = type(scheduler).__name__
    if "FlowMatch" in name or (not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas")):
        return FLOW
    if not hasattr(scheduler, "alphas_cumprod"):
        raise GuidanceError(f"guidance: unsupported scheduler {name} (no alphas_cumprod or sigmas); pass "
                            "GuidanceConfig(x0_fn=...)")
    init = getattr(scheduler, "init_noise_sigma", 1.0)
    init = float(init.max()) if isinstance(init, torch.Tensor) else float(init)
    return SIGMA if hasattr(scheduler, "sigmas") and init > 1.0 + 1e-6 else VP


def _sigma(scheduler, timestep) -> float:
    idx = getattr(scheduler, "step_index", None)
    if idx is None:
        idx = getattr(scheduler, "begin_index", None)  # set_begin_index(0) before the first step
    if idx is None:
        if hasattr(scheduler, "index_for_timestep"):
            idx = scheduler.index_for_timestep(timestep if isinstance(timestep, torch.Tensor) else
                                               torch.tensor(timestep))
        else:  # pragma: no cover
            t = float(timestep)
            return t / float(scheduler.config.num_train_timesteps)
    return float(scheduler.sigmas[int(idx)])


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep) -> torch.Tensor:
    """The clean-latent prediction the scheduler itself would make (differentiable in both tensors)."""
    kind = scheduler_kind(scheduler)
    pred = getattr(scheduler.config, "prediction_type", None) or ("flow" if kind == FLOW else "epsilon")
    if kind == FLOW:
        return sample - _sigma(scheduler, timestep) * model_output
    if kind == SIGMA:
        s = _sigma(scheduler, timestep)
        if pred == "epsilon":
            return sample - s * model_output
        if pred == "v_prediction":
            return model_output * (-s / math.sqrt(s * s + 1)) + sample / (s * s + 1)
        if pred == "sample":
            return model_output
        raise GuidanceError(f"guidance: unsupported prediction_type {pred!r}")
    t = int(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else int(timestep)
    ab = float(scheduler.alphas_cumprod[t])
    a, b = math.sqrt(ab), math.sqrt(1.0 - ab)
    if pred == "epsilon":
        return (sample - b * model_output) / a
    if pred == "v_prediction":
        return a * sample - b * model_output
    if pred == "sample":
        return model_output
    raise GuidanceError(f"guidance: unsupported prediction_type {pred!r}")


def model_input_scale(scheduler, timestep) -> float:
    """What the pipeline multiplies the latent by before the denoiser (``scale_model_input``)."""
    if scheduler_kind(scheduler) == SIGMA:
        s = _sigma(scheduler, timestep)
        return 1.0 / math.sqrt(s * s + 1.0)
    return 1.0


def _unpack_flux(x: torch.Tensor, img_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """FLUX packs 2x2 latent patches into tokens (B, h*w, 4C); img_ids (h*w, 3) holds (0, row, col)."""
    if img_ids is None:
        raise GuidanceError("guidance: packed (B, tokens, C) latents but no img_ids seen in the denoiser call; "
                            "cannot unpack them for the VAE")
    ids = img_ids.reshape(-1, img_ids.shape[-1])
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    b, n, c = x.shape
    if h * w != n or c % 4:
        raise GuidanceError(f"guidance: cannot unpack latents {tuple(x.shape)} with a {h}x{w} token grid")
    return x.view(b, h, w, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, 2 * h, 2 * w)


class LatentRefiner:
    """One guided step on a latent, from a pipeline's VAE and scheduler and a :class:`GuidanceConfig`.

    ``refiner.step(sample, model_output, timestep, step, num_steps)`` returns the refined latent
    (a new tensor) or ``sample`` itself (the same object, untouched) when the step is not scheduled.
    ``refiner.loss(images)`` and ``refiner.loss_and_grad(...)`` expose the pieces (tests, custom loops).
    ``history`` gets one dict per guided step (step, timestep, loss before the update per sample).
    """

    def __init__(self, pipe, config: GuidanceConfig, *, scheduler=None):
        if not isinstance(config, GuidanceConfig):
            raise TypeError(f"guidance: expected a GuidanceConfig, got {type(config).__name__}")
        vae = getattr(pipe, "vae", None)
        if vae is None or not callable(getattr(vae, "decode", None)):
            raise GuidanceError(f"guidance needs a pipeline with a VAE (pipe.vae); {type(pipe).__name__} has "
                                f"{'none' if vae is None else type(vae).__name__}")
        self.pipe = pipe
        self.vae = vae
        self.config = config
        self._scheduler = scheduler
        self._refs: dict[str, torch.Tensor] = {}
        self.img_ids: Optional[torch.Tensor] = None  # FLUX token grid (set by the installer's pre-hook)
        self.history: list[dict] = []
        self.keep_history = True

    @property
    def scheduler(self):
        return self._scheduler if self._scheduler is not None else self.pipe.scheduler

    # ---------------- scoring ----------------
    def _terms(self):
        w_c, w_s = self.config.weights
        c = self.config
        out = []
        if c.subject_scorer is not None:
            out.append(("subject", c.subject_scorer, c.subject_images, w_c))
        if c.style_scorer is not None:
            out.append(("style", c.style_scorer, c.style_images, w_s))
        return out

    def reference_embeddings(self, role: str) -> torch.Tensor:
        """(R, D) unit-norm reference embeddings of ``role`` ("subject"/"style"), computed once."""
        if role in self._refs:
            return self._refs[role]
        scorer = getattr(self.config, f"{role}_scorer")
        images = getattr(self.config, f"{role}_images")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise GuidanceError(f"guidance: {role}_images is empty")
        embs = []
        with torch.no_grad():
            for i, item in enumerate(items):
                who = f"guidance: {role}_images" + (f"[{i}]" if len(items) > 1 else "")
                x = check_images(item, who)
                check_range(x, who)
                embs.append(check_embeddings(scorer(x), x.shape[0], f"{role}_scorer (on {role} references)"))
        if len({e.shape[1] for e in embs}) != 1:
            raise GuidanceError(f"guidance: {role}_scorer returned embeddings of different widths for the references")
        ref = torch.nn.functional.normalize(torch.cat(embs).float(), dim=-1).detach()
        self._refs[role] = ref
        return ref

    def term_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample unweighted losses ``1 - mean_r cos(scorer(images), ref_r)`` per term."""
        out = {}
        for role, scorer, _, _ in self._terms():
            ref = self.reference_embeddings(role)
            emb = check_embeddings(scorer(images), images.shape[0], f"{role}_scorer")
            if emb.shape[1] != ref.shape[1]:
                raise GuidanceError(f"guidance: {role}_scorer returned width {emb.shape[1]} for images but "
                                    f"{ref.shape[1]} for the references")
            e = torch.nn.functional.normalize(emb, dim=-1)
            out[role] = 1.0 - (e @ ref.to(device=e.device, dtype=e.dtype).T).mean(dim=1)
        return out

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted loss (B,) of decoded images in [0, 1]."""
        weights = {role: w for role, _, _, w in self._terms()}
        terms = self.term_losses(images)
        return sum(weights[r] * v for r, v in terms.items())

    # ---------------- latent -> image ----------------
    def predict_x0(self, sample, model_output, timestep):
        if self.config.x0_fn is not None:
            return self.config.x0_fn(self.scheduler, sample, model_output, timestep)
        return predict_x0(self.scheduler, sample, model_output, timestep)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents (as the scheduler holds them) -> images in [0, 1] (differentiable)."""
        vae = self.vae
        if latents.ndim == 3:
            latents = _unpack_flux(latents, self.img_ids)
        cfg = vae.config
        lat = latents.to(dtype=vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        scale = getattr(cfg, "scaling_factor", 1.0) or 1.0
        if mean is not None and std is not None:
            c = lat.shape[1]
            lat = lat * torch.tensor(std, device=lat.device, dtype=lat.dtype).view(1, c, 1, 1) / scale + torch.tensor(
                mean, device=lat.device, dtype=lat.dtype).view(1, c, 1, 1)
        else:
            lat = lat / scale
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            lat = lat + shift
        img = vae.decode(lat, return_dict=False)[0]
        return img / 2 + 0.5

    @contextlib.contextmanager
    def _vae_settings(self):
        tiling = self.config.vae_tiling
        if tiling is None or not hasattr(self.vae, "use_tiling"):
            yield
            return
        saved = self.vae.use_tiling
        self.vae.use_tiling = bool(tiling)
        try:
            yield
        finally:
            self.vae.use_tiling = saved

    def latent_loss(self, sample, model_output, timestep) -> torch.Tensor:
        """Per-sample loss of the latent (differentiable in ``sample`` and ``model_output``)."""
        return self.loss(self.decode(self.predict_x0(sample, model_output, timestep)))

    def loss_and_grad(self, sample: torch.Tensor, model_output: torch.Tensor, timestep,
                      denoise: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss (B,), dL/d sample) without keeping any graph. ``denoise(z) -> model_output``
        (differentiable) replaces the fixed ``model_output`` (the "denoiser" gradient mode)."""
        slices = range(sample.shape[0]) if (self.config.vae_slicing and sample.shape[0] > 1) else [None]
        losses, grads = [], []
        with torch.inference_mode(False), torch.enable_grad(), self._vae_settings():
            for i in slices:
                sl = slice(None) if i is None else slice(i, i + 1)
                z = sample[sl].detach().clone().requires_grad_(True)
                if denoise is not None:
                    mo = denoise(z, sl)
                else:
                    mo = model_output[sl].detach().clone()
                loss = self.latent_loss(z, mo, timestep)
                if loss.shape != (z.shape[0],):
                    raise GuidanceError(f"guidance: per-sample loss has shape {tuple(loss.shape)}, expected ({z.shape[0]},)")
                (g,) = torch.autograd.grad(loss.sum(), z)
                losses.append(loss.detach())
                grads.append(g.detach())
                del z, mo, loss, g
        loss, grad = torch.cat(losses), torch.cat(grads)
        if not bool(torch.isfinite(grad).all()):
            raise GuidanceError("guidance: the latent gradient has non-finite values (fp16 VAE overflow? try the "
                                "VAE in float32)")
        return loss, grad

    def update(self, sample: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``sample - eta * g`` with g the (optionally RMS-normalised) gradient; keeps dtype/device."""
        ct = torch.promote_types(sample.dtype, torch.float32)  # fp16/bf16 latents: update in fp32
        g = grad.to(ct)
        if self.config.normalize == "rms":
            dims = tuple(range(1, g.ndim))
            rms = g.pow(2).mean(dim=dims, keepdim=True).sqrt()
            g = g / rms.clamp_min(1e-12)
        return (sample.to(ct) - self.config.eta * g).to(sample.dtype)

    def step(self, sample, model_output, timestep, step: int, num_steps: Optional[int],
             denoise: Optional[Callable] = None) -> torch.Tensor:
        """Refine ``sample`` if step ``step`` of ``num_steps`` is scheduled; else return it unchanged."""
        if not self.config.is_guided(step, num_steps):
            return sample
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise GuidanceError("guidance: the latent must be a floating-point tensor")
        loss, grad = self.loss_and_grad(sample, model_output, timestep, denoise)
        if self.keep_history:
            t = timestep.reshape(-1)[0].item() if isinstance(timestep, torch.Tensor) else timestep
            self.history.append({"step": step, "timestep": t, "loss": loss.float().cpu().tolist(),
                                 "grad_rms": float(grad.float().pow(2).mean().sqrt())})
        return self.update(sample, grad)
