"""The hooks on each denoiser (``unet`` / ``transformer``): one denoiser call, from the timestep it
receives to the engine, under the installation's lock.

    pre_hook(denoiser, args, kwargs):
        engine.enter()                              (the lock, held to the end of this denoiser call)
        the calling pipeline (the nearest frame up the stack whose ``self`` is a pipeline holding
        this denoiser: a request's ``from_pipe`` copy with its own scheduler), else the installed
        pipeline's scheduler now (the user's own loop)
        timestep -> (t0, tau)                       (timestep.py: tau = clamp(1 - t0 / divisor, 0, 1))
        the run of that scheduler's ``timesteps`` (replaced by every set_timesteps: a new generation)
        from engine.runs, or engine.start_run(...) and each layer's state key checked once
        engine.begin_call(tau, run=...)             (method.begin_step, merged-weight flips, recorder)
    post_hook (a forward hook, always called, also after an exception): engine.leave()

Concurrent requests (diffusers' server pattern: shared components, ``Pipeline.from_pipe(shared,
scheduler=...)`` per request, requests in threads) thus run their denoiser calls one at a time, each
on its own run's step, gates and merged weights (flipped back and forth between requests' calls).
A call whose run cannot be told apart from another thread's raises a RuntimeError instead: no
calling pipeline found (the user's own loop) or a compiled denoiser while another thread's call ran
meanwhile; a request's run continued from another thread (two requests on one scheduler).

``tau`` stays a device tensor when the timestep is one; a CPU timestep is read on the host (the
static methods then decide on the host, bit-identically).
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
from torch import nn

from .discovery import _unwrap
from .timestep import _progress_of, _timestep_divisor

# frames searched above the pre-hook for the calling pipeline (torch's hook dispatch, accelerate's
# and diffusers' wrappers sit in between)
_MAX_FRAMES = 16


def make_denoiser_hooks(h, comp: str, pos: int | None):
    """``(pre_hook, post_hook)`` of installation ``h`` (held weakly) for its denoiser ``comp`` (the
    pipeline attribute) whose ``timestep`` is its positional argument ``pos`` (or a keyword)."""
    ref = weakref.ref(h)
    engine = h.engine
    held = threading.local()  # per thread: one flag per denoiser call in progress, True: it holds the lock

    # both run eagerly even inside a compiled region (module.compile() traces forward hooks): host
    # bookkeeping (the lock, counters, run detection, the method's own state) must not become guards;
    # the cost is a graph break at the top and at the end of each denoiser call, none per layer.
    @torch._dynamo.disable
    def pre_hook(module, args, kwargs):
        stack = held.__dict__.setdefault("stack", [])
        stack.append(False)
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
        pipe, compiled = calling_pipeline(comp, module)
        thread = threading.get_ident()
        waited = engine.enter()
        stack[-1] = True  # the post-hook gives the lock back, also when this hook raises
        if h._removed:  # removed while this call waited
            return None
        if pipe is None or pipe is (h._pipe() if h._pipe is not None else None):
            sched = live_scheduler(h, module)
            divisor = h._timestep_divisor
        else:  # a request's pipeline (from_pipe) with its own scheduler
            sched = getattr(pipe, "scheduler", None)
            divisor = h._timestep_divisor if h._divisor_fixed else _timestep_divisor(_unwrap(module), sched)
        marker = getattr(sched, "timesteps", None) if sched is not None else None
        run = engine.runs.get(marker)
        own = _untold(pipe, compiled)  # why this call's run could be another thread's too
        why = None
        if waited:  # another thread's denoiser call ran meanwhile: both runs must be told apart
            why = own or h._untold or ("two requests share one scheduler" if run is not None and run is engine.run
                                       else None)
        if why is None and pipe is not None and run is not None and run.thread != thread:
            why = "two requests share one scheduler"  # a pipeline call makes its denoiser calls in one thread
        if why:
            raise RuntimeError(
                f"lorafuse: two threads run denoiser calls through one installation ({getattr(h.method, 'name', '')})"
                f" and their sampling runs cannot be told apart ({why}); give each request its own pipeline and "
                "scheduler (Pipeline.from_pipe(shared, scheduler=...)), without torch.compile, or serialise the "
                "requests")
        h._untold = own
        if run is None:  # set_timesteps() ran: a new sampling run
            run = engine.start_run(marker)
            h._check_states()
        num_steps = getattr(sched, "num_inference_steps", None) if sched is not None else None
        t0, tau = _progress_of(ts, divisor)
        engine.begin_call(tau, run=run, num_steps=num_steps, timestep=ts, t0=t0)
        return None

    @torch._dynamo.disable
    def post_hook(module, args, output):
        stack = held.__dict__.get("stack")
        if stack and stack.pop():
            try:
                engine.end_call()
            finally:
                engine.leave()

    return pre_hook, post_hook


def _untold(pipe, compiled: bool) -> str | None:
    """Why a denoiser call's run could be another thread's too (None: its own pipeline's run)."""
    if compiled:
        return "the denoiser is compiled"
    if pipe is None:
        return "a denoiser call came from outside a diffusers pipeline call (the user's own loop)"
    return None


def calling_pipeline(comp: str, denoiser: nn.Module):
    """``(pipeline, compiled)``: the pipeline whose ``__call__`` (or other method) is calling
    ``denoiser`` now, found as the nearest frame up the stack whose ``self`` holds ``denoiser`` as its
    ``comp`` attribute (or a compiled wrapper of it); None when no such frame is near (the user's own
    loop). ``compiled``: the denoiser runs compiled (``torch.compile`` or ``module.compile()``)."""
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        frame = frame.f_back
        if frame is None:
            break
        code = frame.f_code
        if not code.co_argcount or code.co_varnames[0] != "self":
            continue
        obj = frame.f_locals.get("self")
        if obj is None or isinstance(obj, nn.Module):
            continue
        held = getattr(obj, comp, None)
        if held is denoiser or getattr(held, "_orig_mod", None) is denoiser:
            return obj, held is not denoiser or getattr(denoiser, "_compiled_call_impl", None) is not None
    return None, getattr(denoiser, "_compiled_call_impl", None) is not None


def live_scheduler(h, denoiser):
    """The installed pipeline's scheduler now (a swapped scheduler is followed at the next denoiser
    call, with its own num_train_timesteps unless the user fixed timestep_divisor)."""
    pipe = h._pipe() if h._pipe is not None else None
    sched = getattr(pipe, "scheduler", None) if pipe is not None else h._scheduler
    if sched is not h._scheduler:
        old = h.engine.runs.find(getattr(h._scheduler, "timesteps", None)) if h._scheduler is not None else None
        if old is not None:
            old.invalidate()  # a new scheduler starts a new run
        h._scheduler = sched
        if not h._divisor_fixed:
            h._timestep_divisor = _timestep_divisor(_unwrap(denoiser), sched)
    return sched
