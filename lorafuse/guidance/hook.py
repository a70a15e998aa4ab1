"""Install the latent refinement on a diffusers pipeline: a wrapped ``scheduler.step``.

Why a wrapped scheduler step and not ``callback_on_step_end``: the callback fires *after* the step
and is not given the noise prediction, which the x0 prediction needs; ``scheduler.step(model_output,
timestep, sample)`` receives exactly (eps or v, t, z_t). The wrapper refines z_t, then runs the
original step on it (the order of the paper's pseudo-code: z_t <- z_t - eta grad; z_{t-1} = step).
It is an instance attribute on the scheduler object (the class is untouched); ``remove()`` deletes it
(or puts back what was there), so the pipeline is exactly as before. A forward pre-hook on the
denoiser (i) wraps a scheduler the user swapped in after installation (``pipe.scheduler = ...``),
(ii) remembers FLUX's ``img_ids`` (to unpack latents for the VAE) and (iii) in the "denoiser"
gradient mode keeps the last call's arguments, dropped after the step.

Step numbering: the wrapper counts ``step()`` calls of a run (reset when ``set_timesteps`` replaces
``scheduler.timesteps``): step i of N = len(scheduler.timesteps).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
from torch import nn

from ..integrations import installed_fusion, register_guidance
from .config import GuidanceConfig, GuidanceError
from .refine import LatentRefiner, model_input_scale

_ATTR = "_lorafuse_guidance_handle"
_MISSING = object()
_DENOISER_NAMES = ("unet", "transformer")
_LATENT_KEYS = ("sample", "hidden_states", "x")


def _get(args, kwargs, pos, name):
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


class GuidanceHandle:
    """What :func:`enable_guidance` installed (also owned by a :class:`~lorafuse.FusionHandle` when
    given to ``accelerate_fusion(..., guidance=...)``). ``remove()`` undoes it; idempotent.

    Attributes: ``refiner`` (the :class:`LatentRefiner`; ``refiner.history`` logs guided steps),
    ``config``, ``steps_seen`` (scheduler steps seen), ``guided`` (steps refined)."""

    def __init__(self, pipe, config: GuidanceConfig):
        if isinstance(pipe, nn.Module) or not hasattr(pipe, "scheduler"):
            raise GuidanceError(f"guidance needs a diffusers pipeline (with a scheduler and a VAE), got "
                                f"{type(pipe).__name__}")
        self.refiner = LatentRefiner(pipe, config)  # raises without a VAE
        self.config = config
        self._pipe_ref = weakref.ref(pipe)
        self._wrapped: list[tuple] = []  # (scheduler, saved instance 'step' or _MISSING, wrapper)
        self._hooks = []
        self._denoisers = [getattr(pipe, n) for n in _DENOISER_NAMES if isinstance(getattr(pipe, n, None), nn.Module)]
        self._last_call = None
        self._in_rerun = False
        self._marker = None
        self._count = 0
        self.steps_seen = 0
        self.guided = 0
        self._removed = False
        if config.grad_through == "denoiser" and not self._denoisers:
            raise GuidanceError("guidance: grad_through='denoiser' needs a pipeline with a unet or transformer")
        try:
            self._wrap(pipe.scheduler)
            for d in self._denoisers:
                self._hooks.append(d.register_forward_pre_hook(self._make_pre_hook(d), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        return not self._removed

    @property
    def history(self) -> list[dict]:
        return self.refiner.history

    def remove(self) -> None:
        """Restore the scheduler(s) and remove the denoiser hooks. Idempotent."""
        if self._removed:
            return
        self._removed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for sched, saved, wrapper in self._wrapped:
            if sched.__dict__.get("step") is wrapper:
                if saved is _MISSING:
                    del sched.__dict__["step"]
                else:
                    sched.__dict__["step"] = saved
        self._wrapped.clear()
        self._last_call = None
        pipe = self._pipe_ref()
        if pipe is not None and pipe.__dict__.get(_ATTR) is self:
            del pipe.__dict__[_ATTR]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return (f"GuidanceHandle(eta={self.config.eta}, grad_through={self.config.grad_through!r}, "
                f"guided={self.guided}/{self.steps_seen}, {'active' if self.active else 'removed'})")

    # ---------------- installation ----------------
    def _wrap(self, sched) -> None:
        if sched is None or not callable(getattr(sched, "step", None)):
            raise GuidanceError("guidance: the pipeline has no scheduler with a step() method")
        for s, _, _ in self._wrapped:
            if s is sched:
                return
        saved = sched.__dict__.get("step", _MISSING)
        original = sched.step  # bound method (or an earlier instance wrapper: chained)
        ref = weakref.ref(self)

        def step(*args, **kwargs):
            h = ref()
            if h is None or h._removed:
                return original(*args, **kwargs)
            return h._step(sched, original, args, kwargs)

        step.__wrapped__ = original
        step._lorafuse_guidance = ref
        sched.__dict__["step"] = step
        self._wrapped.append((sched, saved, step))

    def _make_pre_hook(self, denoiser):
        ref = weakref.ref(self)

        def pre_hook(module, args, kwargs):
            h = ref()
            if h is None or h._removed or h._in_rerun:
                return None
            pipe = h._pipe_ref()
            if pipe is not None and getattr(pipe, "scheduler", None) is not None:
                h._wrap(pipe.scheduler)  # a scheduler swapped in after installation
            img_ids = kwargs.get("img_ids")
            if isinstance(img_ids, torch.Tensor):
                h.refiner.img_ids = img_ids
            if h.config.grad_through == "denoiser":
                h._last_call = (module, args, dict(kwargs))
            return None

        return pre_hook

    # ---------------- per scheduler step ----------------
    def _step(self, sched, original, args, kwargs):
        marker = getattr(sched, "timesteps", None)
        if marker is not self._marker:
            self._marker = marker
            self._count = 0
        i = self._count
        self._count += 1
        self.steps_seen += 1
        num = len(marker) if marker is not None else getattr(sched, "num_inference_steps", None)
        model_output, timestep = _get(args, kwargs, 0, "model_output"), _get(args, kwargs, 1, "timestep")
        sample = _get(args, kwargs, 2, "sample")
        if not self.config.is_guided(i, num):
            self._last_call = None
            return original(*args, **kwargs)
        self.refiner._scheduler = sched
        try:
            denoise = self._denoise_fn(sched, sample, model_output, timestep) \
                if self.config.grad_through == "denoiser" else None
            new = self.refiner.step(sample, model_output, timestep, i, num, denoise=denoise)
        finally:
            self._last_call = None
            self.refiner._scheduler = None
        self.guided += 1
        if "sample" in kwargs:
            kwargs = dict(kwargs, sample=new)
        else:
            args = args[:2] + (new,) + tuple(args[3:])
        return original(*args, **kwargs)

    def _denoise_fn(self, sched, sample, model_output, timestep):
        """``fn(z, slice) -> model_output`` re-running the last denoiser call on z (autograd on), the
        value replaced by the pipeline's own ``model_output`` (straight-through)."""
        call = self._last_call
        if call is None:
            raise GuidanceError("guidance: grad_through='denoiser' saw no denoiser call before scheduler.step")
        module, args, kwargs = call
        key = next((k for k in _LATENT_KEYS if k in kwargs), None)
        lat = kwargs[key] if key is not None else args[0]
        b = sample.shape[0]
        if lat.shape[0] % b:
            raise GuidanceError(f"guidance: denoiser batch {lat.shape[0]} is not a multiple of the latent batch {b}")
        k = lat.shape[0] // b
        pipe = self._pipe_ref()
        gs = float(getattr(pipe, "guidance_scale", 1.0) or 1.0) if pipe is not None else 1.0
        if k not in (1, 2):
            raise GuidanceError(f"guidance: grad_through='denoiser' supports one or two (CFG) copies of the latent "
                                f"per denoiser call, got {k}")
        scale = model_input_scale(sched, timestep)

        def denoise(z, sl):
            zb = z.shape[0]
            z_in = (z * scale).to(lat.dtype)
            z_all = torch.cat([z_in] * k) if k > 1 else z_in
            a, kw = list(args), dict(kwargs)
            if key is not None:
                kw[key] = z_all
            else:
                a[0] = z_all
            for name, v in list(kw.items()):  # per-row conditioning follows the slice
                if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == lat.shape[0] and name != key:
                    kw[name] = v.reshape(k, b, *v.shape[1:])[:, sl].reshape(k * zb, *v.shape[1:])
                elif isinstance(v, dict):
                    kw[name] = {n: (t.reshape(k, b, *t.shape[1:])[:, sl].reshape(k * zb, *t.shape[1:])
                                    if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == lat.shape[0]
                                    else t) for n, t in v.items()}
            self._in_rerun = True
            try:
                with _fusion_suspended(module):
                    out = module(*a, **kw)
            finally:
                self._in_rerun = False
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            out = out[:, : model_output.shape[1]] if out.ndim == model_output.ndim else out
            if k == 2:
                u, c = out.chunk(2)
                out = u + gs * (c - u)
            out = out.to(model_output.dtype)
            fixed = model_output[sl].detach()
            return fixed + (out - out.detach())

        return denoise


@contextlib.contextmanager
def _fusion_suspended(denoiser):
    """While the denoiser runs again with autograd, a lorafuse fusion handle on it steps aside
    (:meth:`FusionHandle.suspended`: PEFT's forward, step counters and gate log untouched)."""
    h = installed_fusion(denoiser)
    if h is None:
        yield
        return
    with h.suspended():
        yield


def enable_guidance(pipe, config: GuidanceConfig) -> GuidanceHandle:
    """Install latent refinement on ``pipe`` (any method or no fusion at all); returns the handle.
    A previous standalone installation on the same pipeline is removed first."""
    remove_guidance(pipe)
    h = GuidanceHandle(pipe, config)
    pipe.__dict__[_ATTR] = h
    return h


def remove_guidance(pipe) -> bool:
    """Remove a guidance installed by :func:`enable_guidance` (True if there was one)."""
    h = getattr(pipe, "__dict__", {}).get(_ATTR)
    if h is None:
        return False
    h.remove()
    return True


def active_guidance(pipe) -> Optional[GuidanceHandle]:
    """The live guidance handle wrapping ``pipe.scheduler`` (standalone or owned by a fusion handle)."""
    step = getattr(getattr(pipe, "scheduler", None), "__dict__", {}).get("step")
    for _ in range(32):  # follow a chain of wrappers
        if step is None:
            return None
        ref = getattr(step, "_lorafuse_guidance", None)
        h = ref() if ref is not None else None
        if h is not None and h.active:
            return h
        step = getattr(step, "__wrapped__", None)
    return None


# accelerate_fusion(pipe, ..., guidance=GuidanceConfig(...)) installs through this (integrations sits
# below guidance and never imports it)
register_guidance(GuidanceConfig, enable_guidance)
