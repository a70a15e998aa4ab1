""":class:`FusionHandle`: what :func:`~lorafuse.integrations.diffusers.accelerate_fusion` installed on
a pipeline, and its exact undo.

An installation is a :class:`~lorafuse.engine.FusionEngine` (the method, the merged weights, the gate
log, the sampling run) over one :class:`~.peft_layer.PeftLayer` per patched PEFT layer, plus what
lives in the module tree: each patched layer's forward (:mod:`.layer_hook`), a pre-hook per denoiser
(:mod:`.denoiser_hook`), the covered unpatched layers (:mod:`.coverage`), the adapters activated on
the denoisers' LoRA layers, and the watches of :mod:`.watches`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from ..engine import FusionEngine, SamplingRun
from ..engine.gate_plot import plot_gate_log
from ..fusion import FusionMethod, LayerLoRAs
from .coverage import Coverage
from .denoiser_hook import make_denoiser_hooks
from .discovery import _unwrap, plan_layers
from .fallbacks import FallbackReport
from .layer_hook import make_layer_forward, make_merge_guard
from .offload import ancestors, disk_copies
from .peft_layer import KERNEL_DTYPES, PeftLayer
from .peft_state import (_CAST_HOOK, _diffusers_slot, _real_weight, activate_adapters, restore_adapters,
                         unhook_diffusers)
from .timestep import _timestep_position
from .watches import Watches

_HANDLE_ATTR = "_lorafuse_fusion_handle"
_STALE = ("LoRA weights changed after accelerate_fusion (hotswap?): the method's static per-layer scores are "
          "stale; call accelerate_fusion again")


class AttachedHandle(Protocol):
    """What ``accelerate_fusion(guidance=...)`` attaches to a :class:`FusionHandle` (a
    :class:`lorafuse.guidance.GuidanceHandle`): removed with it."""

    def remove(self) -> None: ...


def installed_fusion(denoiser: nn.Module) -> FusionHandle | None:
    """The active :class:`FusionHandle` installed on ``denoiser`` (a pipeline's unet / transformer),
    or None."""
    h = getattr(denoiser, "__dict__", {}).get(_HANDLE_ATTR)
    return h if h is not None and h.active else None


def _progress_bar(desc: str):
    """``progress(iterable, total)`` for :attr:`FusionMethod.progress`: a tqdm bar that appears only
    when the loop runs longer than a second (K-LoRA's statistics for 560 SDXL layers take seconds)."""

    def progress(iterable, total):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with the diffusers extra
            return iterable
        return tqdm(iterable, total=total, desc=desc, unit="layer", delay=1.0, leave=False)

    return progress


class FusionHandle:
    """What :func:`accelerate_fusion` installed; :meth:`remove` undoes it exactly (idempotent).

    Attributes:
        method: the :class:`~lorafuse.fusion.base.FusionMethod` driving the gates.
        subject, style: the adapter names. backend: the kernel backend passed to the method.
        layer_names: module paths of the patched layers, in method layer-index order.
        fallbacks: reason -> number of layer calls that left the fused / merged path for that reason.
        calls: denoiser calls seen since installation.
        guidance: the :class:`~lorafuse.guidance.GuidanceHandle` of ``accelerate_fusion(guidance=...)``.
        engine: the :class:`~lorafuse.engine.FusionEngine`; ``run``: its current sampling run.

    Which adapters it activates, what falls back and why, and the order with compile / offload /
    hotswap: see :func:`accelerate_fusion`; :meth:`summary` says what this installation covers.
    """

    method: FusionMethod
    subject: str
    style: str
    backend: str
    weights: str
    log_gates: bool
    fallbacks: dict[str, int]
    calls: int
    guidance: AttachedHandle | None
    progress: bool

    def __init__(self, pipe, denoisers, method, subject, style, backend, log_gates, scheduler, timestep_divisor,
                 weights="scratch", coverage="method", gate_log_sink=None):
        self._denoisers = denoisers
        self.method = method
        self.subject = subject
        self.style = style
        self.backend = backend
        self.weights = weights
        self._layers: list[PeftLayer] = []  # filled by _install; the engine and its gate log share the list
        self._log_layers: list = []  # the gate log's: _layers, then the covered layers (Coverage.logged)
        self.engine = FusionEngine(method, self._layers, weights=weights, backend=backend, log_gates=log_gates,
                                   gate_log_sink=gate_log_sink, log_layers=self._log_layers)
        self._report = FallbackReport(self.engine.fallbacks)
        self._pipe = None if isinstance(pipe, nn.Module) else weakref.ref(pipe)
        self._scheduler = scheduler
        self._timestep_divisor = timestep_divisor
        self._divisor_fixed = False  # True when the user passed timestep_divisor
        self._untold: str | None = None  # why the last denoiser call's run could not be told apart (denoiser_hook)
        self._hooks = []
        self._activated: list[tuple[Any, Any, Any]] = []  # (module, saved _active_adapter, list we set)
        self._removed = False
        self._suspended = False  # see suspended()
        self.guidance = None  # what accelerate_fusion(guidance=...) attached
        self._unpatched: list[tuple[str, str]] = []  # (module path, why) of LoRA layers left on PEFT
        self._hook_slots: list[tuple[Any, str, Any, Any]] = []  # (diffusers hook fn ref, attribute, saved, ours)
        self._coverage = Coverage(coverage)
        self._watches = Watches()
        self.progress = False  # a progress bar for the method's preparation (accelerate_fusion(progress=...))

    # ---------------- public ----------------
    @property
    def active(self) -> bool:
        return not self._removed

    @property
    def coverage(self) -> str:
        return self._coverage.policy

    @property
    def calls(self) -> int:
        return self.engine.calls

    @property
    def fallbacks(self) -> dict[str, int]:
        return self.engine.fallbacks

    @property
    def log_gates(self) -> bool:
        return self.engine.log_gates

    @property
    def run(self) -> SamplingRun | None:
        """The current :class:`~lorafuse.engine.SamplingRun` (step, tau, recorder; None before the
        first denoiser call): a new one at each generation; with concurrent requests, the run of the
        last denoiser call (each request's own: ``engine.runs``)."""
        return self.engine.run

    @property
    def layer_names(self) -> list[str]:
        return [r.path for r in self._layers]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def gate_log(self) -> list[dict[str, Any]]:
        """One dict per (layer, layer call inside a denoiser call), converted to Python lazily: of
        the last sampling run by default (see ``accelerate_fusion(log_gates=...)``)."""
        return self.engine.log.entries()

    def clear_gate_log(self) -> None:
        self.engine.log.clear()

    def plot_gates(self, path: str | os.PathLike[str], *, which: str = "subject") -> None:
        """Write a PNG heatmap, layers (rows, module paths: the patched layers, then the covered ones
        the log names) x denoising steps (columns, from 1), of the ``which`` gate: 1 = that LoRA
        acts, 0 = it does not (per-sample gates are averaged); see
        :func:`lorafuse.engine.gate_plot.plot_gate_log`."""
        if which not in ("subject", "style"):
            raise ValueError(f"plot_gates: which must be 'subject' or 'style', got {which!r}")
        log = self.gate_log
        if not log:
            raise ValueError("plot_gates: the gate log is empty (run the pipeline with log_gates=True first)")
        plot_gate_log(log, path, which=which, layer_names=[r.path for r in self._log_layers],
                      title=f"{getattr(self.method, 'name', 'fusion')}: {which} gate")

    @contextlib.contextmanager
    def suspended(self) -> Iterator[FusionHandle]:
        """Within the block the patched layers run PEFT's own forward and denoiser calls are not
        counted or logged (e.g. an extra autograd pass of the denoiser); afterwards all is as before."""
        previous, self._suspended = self._suspended, True
        try:
            yield self
        finally:
            self._suspended = previous

    def __enter__(self) -> FusionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return (f"FusionHandle({getattr(self.method, 'name', type(self.method).__name__)!r}, subject={self.subject!r}, "
                f"style={self.style!r}, layers={len(self._layers)}, calls={self.calls}, {state})")

    # ---------------- what the engine's tests of the past read ----------------
    @property
    def _merged(self):
        return self.engine.merged

    @property
    def _cover_scores(self) -> dict:
        return self._coverage.scores

    # ---------------- installation ----------------
    def _install(self, pipe) -> None:
        """Patch every layer the two adapters share, cover the others, hook each denoiser and watch
        ``pipe`` (see :func:`accelerate_fusion`)."""
        names = (self.subject, self.style)
        patched, unpatched = plan_layers(self._denoisers, names)
        self._unpatched += [(path, why) for path, _, why in unpatched]
        self._activated += activate_adapters(self._denoisers, names)
        on_stale = functools.partial(self._report.warn_once, _STALE)
        roots = {comp: _unwrap(d) for comp, d in self._denoisers}
        self._layers[:] = [PeftLayer(i, comp, path, mod, names, on_stale, ancestors(roots[comp], path))
                           for i, (comp, path, mod) in enumerate(patched)]
        self._prepare_method()
        for rec in self._layers:
            m = rec.module
            w = rec.base.weight if rec.base is not None else None
            if isinstance(w, torch.Tensor) and not w.is_meta and w.dtype in KERNEL_DTYPES and (
                    m.lora_A[self.subject].weight.device == w.device):
                rec.pack(w)  # pack once now (a compiled graph then finds it)
            slot = _diffusers_slot(m) if "forward" in m.__dict__ else None
            if "forward" in m.__dict__ and slot is None:
                self._report.warn_once("layer already has an instance forward (another hook): left on PEFT")
                self._unpatched.append((f"{rec.component}.{rec.path}", "already has an instance forward (another hook)"))
                continue
            rec.forward = make_layer_forward(self, rec)
            if slot is None:
                m.forward = rec.forward
            else:  # diffusers' hooks (enable_layerwise_casting) wrap the layer: ours goes innermost
                ref, attr = slot
                self._hook_slots.append((ref, attr, getattr(ref, attr), rec.forward))
                setattr(ref, attr, rec.forward)
            if self.engine.merged is not None and self.engine.merged.mode == "inplace" and "merge" not in m.__dict__:
                rec.merge_guard = make_merge_guard(self, rec)
                m.merge = rec.merge_guard
        self._coverage.apply(self, [(path, mod) for path, mod, _ in unpatched], self._hook_slots)
        self._log_layers[:] = [*self._layers, *self._coverage.logged]
        for comp, d in self._denoisers:
            pos = _timestep_position(_unwrap(d))
            pre_hook, post_hook = make_denoiser_hooks(self, comp, pos)
            self._hooks.append(d.register_forward_pre_hook(pre_hook, with_kwargs=True))
            self._hooks.append(d.register_forward_hook(post_hook, always_call=True))
            d.__dict__[_HANDLE_ATTR] = self
        self._watches.watch_offload(self, pipe, self._denoisers)
        if not isinstance(pipe, nn.Module):
            self._watches.weight_text_encoders(self.method, names, pipe)
            if hasattr(type(pipe), "load_lora_weights"):
                self._watches.watch_reloads(self, pipe)

    def _prepare_method(self) -> None:
        """Give the method every patched layer's two LoRAs as they are now and set up the merged
        weights (:meth:`FusionEngine.prepare`); at install, and again after a hotswap."""
        s, t = self.subject, self.style
        disk = disk_copies(_unwrap(d) for _, d in self._denoisers)  # offloaded to disk: read the stored values
        loras = []
        for rec in self._layers:
            mod = rec.module
            loras.append(LayerLoRAs(
                name=f"{rec.component}.{rec.path}",
                subject=(_real_weight(mod.lora_A[s], disk), _real_weight(mod.lora_B[s], disk), mod.scaling[s]),
                style=(_real_weight(mod.lora_A[t], disk), _real_weight(mod.lora_B[t], disk), mod.scaling[t]),
            ))
            rec.install_weights = rec.weights_versions()
            rec.stale_warned = False
            rec.cache.clear()
            rec.ccache.clear()
        w0 = loras[0].subject[0]
        if self.progress and self.method.progress is None:
            self.method.progress = _progress_bar(f"lorafuse: {getattr(self.method, 'name', 'fusion')} statistics")
        self.engine.prepare(loras, None if w0.is_meta else w0.device)

    def _check_states(self) -> None:
        """At the first denoiser call of each sampling run: every layer whose state key changed since
        the last check gets a full check at its next call. Once per run, not per call: it reads every
        layer's LoRA modules, which costs ~20 us per layer with the caches a denoiser call leaves."""
        for rec in self._layers:
            key = rec.state_key()
            if key is None or key != rec.state:
                rec.state = key
                self.engine.recheck(rec)

    def _hand_back(self, rec: PeftLayer) -> None:
        """Before PEFT's own code runs on the layer: in place mode, its original weight back."""
        self.engine.hand_back(rec)

    # ---------------- removal ----------------
    def remove(self) -> None:
        """Undo everything (instance forwards, hooks, active adapters). Idempotent; safe after
        ``pipe.unload_lora_weights()`` / ``delete_adapters``."""
        with self.engine.lock:  # after a denoiser call in progress in another thread
            self._remove()

    def _remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        if self.guidance is not None:
            self.guidance.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._watches.remove_watches()
        self.engine.release([rec.original_weight() for rec in self._layers])  # "inplace": originals back
        self.engine.close()  # the gate log on the host, the sink's last records out
        self._report.warned.clear()
        for rec in self._layers:
            rec.cache.clear()
            rec.ccache.clear()
            m = rec.module
            if rec.merge_guard is not None and m.__dict__.get("merge") is rec.merge_guard:
                del m.__dict__["merge"]
            if rec.forward is None:  # an install that failed before this layer was patched
                continue
            if m.__dict__.get("forward") is rec.forward:
                del m.__dict__["forward"]
            elif getattr(m, "_old_forward", None) is rec.forward:  # an accelerate hook was added on top
                m._old_forward = type(m).forward.__get__(m)
        unhook_diffusers(self._hook_slots, [(rec.module, rec.forward) for rec in self._layers])
        self._coverage.remove()
        restore_adapters(self._activated)
        self._watches.restore_text_encoders()
        for _, d in self._denoisers:
            if d.__dict__.get(_HANDLE_ATTR) is self:
                del d.__dict__[_HANDLE_ATTR]

    # ---------------- reading ----------------
    def summary(self) -> dict[str, Any]:
        """What the installation covers:

        - ``layers``: patched layers, on the ``path`` "merged" (one F.linear on merged weights) or
          "fused" (the fused kernel); ``cast_layers``: how many of them are stored in another dtype
          (``enable_layerwise_casting``: the fused path on a cast copy per call);
        - ``coverage``: the policy for the two adapters' LoRA layers the kernels do not patch;
          ``unpatched``: reason -> number of those layers, split into ``method_gates`` (reason ->
          layers that follow the method's rule through PEFT's forward), ``peft_sum`` (reason ->
          layers left on PEFT's sum of the active adapters; text encoders always stay on PEFT) and
          ``no_lora`` (reason -> layers run with neither adapter, ``coverage="none"``);
          ``unpatched_layers``: their paths;
        - ``covered_by``: what computes each of the two adapters' LoRA layers in the denoisers,
          counted per kind: "linear, merged" / "linear, fused" (patched), "conv, method's rule",
          "single-adapter, method's rule", "conv, no LoRA", "single-adapter, no LoRA", "PEFT's sum";
          ``logged_layers``: how many of them have gate-log records (patched, and covered with a
          rule or no LoRA: what :class:`~lorafuse.integrations.replay.GateReplay` replays);
        - ``gate_log``: what the log keeps (``keeps``, in words), the denoiser calls it holds
          (``calls``) and its ``sink``;
        - ``fallback_calls``: reason -> layer calls that left the fused / merged path so far (see
          :attr:`fallbacks`)."""
        cov = self._coverage
        cast = sum(1 for rec in self._layers if rec.forward is not None and isinstance(getattr(rec.base, "weight", None),
                   torch.Tensor) and _CAST_HOOK in getattr(getattr(rec.base, "_diffusers_hook", None), "hooks", {}))
        info = self.engine.summary()
        layers = sum(rec.forward is not None for rec in self._layers)
        counts = cov.report(self._unpatched)
        return {
            "method": info["method"],
            "layers": layers,
            "path": info["path"],
            "weights": info["weights"],
            "cast_layers": cast,
            "coverage": cov.policy,
            "unpatched": counts["unpatched"],
            "method_gates": counts["method_gates"],
            "peft_sum": counts["peft_sum"],
            "no_lora": counts["no_lora"],
            "unpatched_layers": [p for p, _ in self._unpatched],
            "covered_by": {f"linear, {info['path']}": layers, **counts["covered_by"]},
            "logged_layers": layers + len(cov.logged),
            "gate_log": info["gate_log"],
            "fallback_calls": info["fallback_calls"],
        }
