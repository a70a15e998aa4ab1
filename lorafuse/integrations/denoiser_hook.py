"""The forward pre-hook on each denoiser (``unet`` / ``transformer``): one denoiser call, from the
timestep it receives to the engine.

    pre_hook(denoiser, args, kwargs):
        timestep -> (t0, tau)                       (timestep.py: tau = clamp(1 - t0 / divisor, 0, 1))
        scheduler.timesteps replaced since the run began (set_timesteps: a new generation), or a new
        scheduler -> engine.start_run(...) and each layer's state key checked once
        engine.begin_call(tau, ...)                 (method.begin_step, merged-weight flips, recorder)

``tau`` stays a device tensor when the timestep is one; a CPU timestep is read on the host (the
static methods then decide on the host, bit-identically).
"""

from __future__ import annotations

import weakref

import torch

from .discovery import _unwrap
from .timestep import _progress_of, _timestep_divisor


def make_pre_hook(h, pos: int | None):
    """The pre-hook of installation ``h`` (held weakly) for a denoiser whose ``timestep`` is its
    positional argument ``pos`` (or a keyword)."""
    ref = weakref.ref(h)

    # runs eagerly even inside a compiled region (module.compile() traces forward pre-hooks): host
    # bookkeeping (counters, run detection, the method's own state) must not become guards; the
    # cost is one graph break at the top of each denoiser call, none per layer.
    @torch._dynamo.disable
    def pre_hook(module, args, kwargs):
        h = ref()
        if h is None or h._removed or h._suspended:
            return None
        if "timestep" in kwargs:
            ts = kwargs["timestep"]
        elif pos is not None and len(args) > pos:
            ts = args[pos]
        else:
            ts = None
        if ts is None:
            return None
        sched = live_scheduler(h, module)
        t0, tau = _progress_of(ts, h._timestep_divisor)
        engine = h.engine
        marker = getattr(sched, "timesteps", None) if sched is not None else None
        if engine.run is None or marker is not engine.run.marker:  # set_timesteps() ran: a new sampling run
            engine.start_run(marker)
            h._check_states()
        num_steps = getattr(sched, "num_inference_steps", None) if sched is not None else None
        engine.begin_call(tau, num_steps=num_steps, timestep=ts, t0=t0)
        return None

    return pre_hook


def live_scheduler(h, denoiser):
    """The pipeline's scheduler now (a swapped scheduler is followed at the next denoiser call,
    with its own num_train_timesteps unless the user fixed timestep_divisor)."""
    pipe = h._pipe() if h._pipe is not None else None
    sched = getattr(pipe, "scheduler", None) if pipe is not None else h._scheduler
    if sched is not h._scheduler:
        h._scheduler = sched
        if h.engine.run is not None:
            h.engine.run.invalidate()  # a new scheduler starts a new run
        if not h._divisor_fixed:
            h._timestep_divisor = _timestep_divisor(_unwrap(denoiser), sched)
    return sched
