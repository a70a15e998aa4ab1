"""``fuse_module``: the building block for libraries that are not diffusers + PEFT.

Patches plain ``nn.Linear`` layers (W: N x K, bias b) so that each forward computes

    y = x W^T + b + g_c(tau) s_c (x A_c^T) B_c^T + g_s(tau) s_s (x A_s^T) B_s^T

with the gates of the chosen fusion method, on the same engine as :func:`lorafuse.accelerate_fusion`:
methods whose gates are fixed within a denoiser call (klora, est, merge, subject, style) run one
``F.linear`` on the merged weight ``W_eff = W + g_c s_c B_c A_c + g_s s_s B_s A_s`` (rebuilt from W
when the gates flip), kl runs the fused kernel. The caller drives the sampler's progress::

    fused = lorafuse.fuse_module(linear, subject=(A_c, B_c, 1.0), style=(A_s, B_s, 1.0), method="klora")
    for t in scheduler.timesteps:
        fused.step(tau=1 - t / 1000)     # once per denoiser call
        y = linear(x)                    # fused forward
    fused.remove()                       # the module is exactly as before

For several layers that share one method (K-LoRA's gamma is global), use :func:`fuse_modules`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..fusion import Decision, LayerLoRAs, get_method
from ..fusion.base import FusionMethod
from ..kernels import PackedLoRA
from .gate_log import check_log_options
from .gate_plot import plot_gate_log
from .run import SamplingRun
from .runtime import FusionEngine, LayerSlot, check_engine_options

__all__ = ["LoRATriple", "ModuleFusion", "fuse_module", "fuse_modules"]

# a LoRA as fuse_module takes it: A (r, in), B (out, r), scale (a float or a 0-d tensor)
LoRATriple = tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]

# why a call of a patched module leaves the merged path for the fused one (same result)
_AUTOGRAD = "autograd enabled with trainable weights"
_DTYPE = "input dtype differs from the weight's"


def _scale_key(s):
    return (id(s), s._version) if isinstance(s, torch.Tensor) else s


class _LinearSlot(LayerSlot):
    """A plain ``nn.Linear`` and its two LoRAs (:class:`LayerLoRAs`), as the engine sees them."""

    __slots__ = ("module", "lora", "forward", "state", "packs", "scratch")

    def __init__(self, index: int, module: nn.Linear, lora: LayerLoRAs, scratch: bool):
        super().__init__(index, "", lora.name)
        self.module = module
        self.lora = lora
        self.forward = None
        self.state = None  # the factors' key at the last step() (see ModuleFusion.step)
        self.packs: dict = {}  # (dtype, device) -> PackedLoRA of the current factors
        self.scratch = scratch  # scratch mode: W itself is never written, its version is part of the key

    def key(self):
        """What the merged weight and the packs depend on besides W's identity: the factors' versions
        and the scales (W's version too in scratch mode, where only the user writes W)."""
        (A_c, B_c, s_c), (A_s, B_s, s_s) = self.lora.subject, self.lora.style
        w = self.module.weight
        return (A_c._version, B_c._version, A_s._version, B_s._version, _scale_key(s_c), _scale_key(s_s),
                w._version if self.scratch else None)

    def merge_inputs(self):
        return self.module.weight, [self.lora.subject, self.lora.style], self.key()

    def pack(self, x: torch.Tensor) -> PackedLoRA:
        packed = self.packs.get((x.dtype, x.device))
        if packed is None:
            with torch.no_grad():
                packed = PackedLoRA.pack([self.lora.subject, self.lora.style], dtype=x.dtype, device=x.device)
            if len(self.packs) >= 4:  # bounded: the oldest (dtype, device) goes
                self.packs.pop(next(iter(self.packs)))
            self.packs[(x.dtype, x.device)] = packed
        return packed

    def base_weight(self) -> torch.Tensor:
        return self.module.weight

    def ready(self) -> bool:
        return not self.module.weight.is_meta

    def needs_fused(self, x: torch.Tensor) -> str | None:
        """Why this call cannot take the merged path (None: it can); the fused path gives the same
        result: autograd into trainable tensors (W_eff is built without autograd), or an input
        dtype other than the weight's (the fused kernel's own rules apply)."""
        w = self.module.weight
        if x.dtype != w.dtype:
            return _DTYPE
        if torch.is_grad_enabled():
            (A_c, B_c, _), (A_s, B_s, _) = self.lora.subject, self.lora.style
            if (x.requires_grad or w.requires_grad or A_c.requires_grad or B_c.requires_grad or A_s.requires_grad
                    or B_s.requires_grad):
                return _AUTOGRAD
        return None


class ModuleFusion:
    """Handle of :func:`fuse_modules`: :meth:`step` starts a denoiser call, :meth:`remove` restores
    the modules exactly. Beside ``modules``, ``method`` and ``backend``: ``weights`` (the merged
    weights' mode), :attr:`gate_log`, :meth:`summary` and ``run`` (the current
    :class:`~lorafuse.engine.run.SamplingRun`; :meth:`new_run` starts another)."""

    modules: list[nn.Linear]
    method: FusionMethod
    backend: str
    weights: str

    def __init__(self, modules: Sequence[nn.Linear], method: FusionMethod, layers: Sequence[LayerLoRAs],
                 backend: str, weights: str = "scratch", log_gates: bool | str | int = True, gate_log_sink=None):
        self.modules = list(modules)
        self.method = method
        self.backend = backend
        self.weights = weights
        self._slots = [_LinearSlot(i, m, layer, weights == "scratch")
                       for i, (m, layer) in enumerate(zip(self.modules, layers))]
        self.engine = FusionEngine(method, list(self._slots), weights=weights, backend=backend, log_gates=log_gates,
                                   gate_log_sink=gate_log_sink)
        self.engine.prepare(list(layers), self.modules[0].weight.device)
        self.engine.start_run()
        if getattr(method, "tau_mode", None) != "official":  # official mode needs num_steps: step() gives it
            self.engine.begin_call(0.0, step=0, count=False)  # calls before the first step() run at tau 0
        for rec in self._slots:
            rec.state = rec.key()
            rec.forward = self._make_forward(rec)
            rec.module.forward = rec.forward
        self._removed = False
        self._thread: int | None = None  # the thread stepping the current run (see step)

    def _make_forward(self, rec: _LinearSlot):
        engine = self.engine
        params = rec.module._parameters

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = params["weight"]
            fp = None if torch.is_grad_enabled() else (x.dtype, id(w), w.data_ptr())
            if fp is None or fp != rec.fp:  # first call, or something changed: check again
                reason = rec.needs_fused(x)
                if reason is not None:
                    return self._fused_call(rec, reason, x)
                engine.prepare_layer(rec, x)
                rec.fp = fp
            return engine.call(rec, x, params["weight"], params["bias"])

        return forward

    def _fused_call(self, rec: _LinearSlot, reason: str, x: torch.Tensor) -> torch.Tensor:
        """A call the merged path cannot take: the method's fused path on the original weight
        (counted in ``summary()["fallback_calls"]`` when the merged path is on)."""
        engine = self.engine
        if engine.merged is not None:
            engine.hand_back(rec)
            engine.count_fallback(reason)
        m = rec.module
        y = self.method.layer_forward(rec.index, x, m.weight, m.bias, rec.pack(x), backend=self.backend)
        engine.record(rec.index)
        return y

    # ---------------- per denoiser call ----------------
    def step(self, tau: float | torch.Tensor, *, step: int | None = None, num_steps: int | None = None) -> None:
        """Start a denoiser call at progress ``tau`` in [0, 1] (0 = first, noisiest step); ``step``:
        its index in the run (default: the next one, from 0), ``num_steps``: the sampler's step count
        (needed by ``tau_mode="official"``). Factors or scales written in place since the last call
        are merged / packed again at the next layer call.

        One thread steps a run: a step from another thread before :meth:`new_run` raises a
        RuntimeError (two sampling loops through one ModuleFusion cannot be told apart: each needs
        its own :func:`fuse_modules`, or one loop at a time with :meth:`new_run` between)."""
        thread = threading.get_ident()
        if self._thread is None:
            self._thread = thread
        elif thread != self._thread:
            raise RuntimeError(f"ModuleFusion.step: thread {thread} steps the sampling run that thread {self._thread} "
                               "is stepping; one ModuleFusion serves one sampling loop at a time (call new_run() "
                               "before another thread takes over, or fuse the modules once per loop)")
        for rec in self._slots:
            key = rec.key()
            if key != rec.state:
                rec.state = key
                rec.packs.clear()
                self.engine.recheck(rec)
        self.engine.begin_call(tau, step=step, num_steps=num_steps)

    def new_run(self) -> None:
        """Start a new sampling run: the method forgets its per-run state, steps count from 0, the
        gate log (by default) drops the previous run's records, and the next :meth:`step` may come
        from any thread."""
        self._thread = None
        self.engine.start_run()

    @property
    def run(self) -> SamplingRun:
        """The current :class:`~lorafuse.engine.run.SamplingRun` (step, tau, recorder)."""
        return self.engine.run

    def decision(self, index: int = 0) -> Decision:
        """What module ``index`` applied on its last call."""
        return self.method.last_decision(index)

    # ---------------- reading ----------------
    @property
    def gate_log(self) -> list[dict[str, Any]]:
        """One dict per (module, module call after a :meth:`step`): ``layer`` (its name),
        ``layer_index``, ``call`` (steps since fusing, from 0), ``tau``, ``subject`` / ``style``
        gates and the method's statistics, as :attr:`lorafuse.FusionHandle.gate_log`; of the
        current run only unless ``log_gates`` said otherwise (a run: since :meth:`new_run`)."""
        return self.engine.log.entries()

    def clear_gate_log(self) -> None:
        self.engine.log.clear()

    def plot_gates(self, path: str | os.PathLike[str], *, which: str = "subject") -> None:
        """A PNG heatmap of the ``which`` gate, modules x steps (see ``FusionHandle.plot_gates``)."""
        if which not in ("subject", "style"):
            raise ValueError(f"plot_gates: which must be 'subject' or 'style', got {which!r}")
        log = self.gate_log
        if not log:
            raise ValueError("plot_gates: the gate log is empty (call step() and the modules with log_gates=True)")
        plot_gate_log(log, path, which=which, layer_names=[rec.path for rec in self._slots],
                      title=f"{getattr(self.method, 'name', 'fusion')}: {which} gate")

    def summary(self) -> dict[str, Any]:
        """``method``, ``layers``, ``path`` ("merged": one ``F.linear`` on the merged weight per call;
        "fused": the fused kernel), ``weights`` (the merged weights' mode, None on the fused path)
        ``fallback_calls`` (reason -> calls that left the merged path for the fused one) and
        ``gate_log`` (what the log keeps, the denoiser calls it holds, its sink)."""
        return self.engine.summary()

    # ---------------- undo ----------------
    def remove(self) -> None:
        """Restore every module exactly: its class forward (a forward someone else set since is left
        alone) and, with ``weights="inplace"``, its original weight, bit for bit. Idempotent."""
        if not self._removed:
            self._removed = True
            self.engine.release()
            self.engine.close()
        for rec in self._slots:
            if rec.module.__dict__.get("forward") is rec.forward:
                del rec.module.__dict__["forward"]
            rec.packs.clear()

    def __repr__(self) -> str:
        return (f"ModuleFusion({getattr(self.method, 'name', type(self.method).__name__)!r}, "
                f"modules={len(self.modules)}, path={self.engine.path!r}, weights={self.weights!r})")


def _check_linear(module, i: int) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"fuse_module: module {i} must be an nn.Linear, got {type(module).__name__}")
    if "forward" in module.__dict__:
        raise ValueError(f"fuse_module: module {i} already has a patched forward (call remove() first)")
    return module


def fuse_modules(
    modules: Sequence[nn.Linear],
    subjects: Sequence[LoRATriple],
    styles: Sequence[LoRATriple],
    method: str = "merge",
    *,
    backend: str = "auto",
    names: Sequence[str] | None = None,
    weights: str = "scratch",
    log_gates: bool | str | int = True,
    gate_log_sink: Callable[[list[dict]], None] | str | os.PathLike[str] | None = None,
    **options: Any,
) -> ModuleFusion:
    """Patch several ``nn.Linear`` layers that share one fusion method (see :func:`fuse_module`);
    ``names`` label them in the gate log (default ``module0``, ``module1``, ...)."""
    check_engine_options("fuse_module", weights, backend)
    check_log_options("fuse_module", log_gates, gate_log_sink)
    modules = [_check_linear(m, i) for i, m in enumerate(modules)]
    subjects, styles = list(subjects), list(styles)
    if not (len(modules) == len(subjects) == len(styles)) or not modules:
        raise ValueError(
            f"fuse_modules: need one subject and one style (A, B, scale) per module and at least one module, got "
            f"{len(modules)} modules, {len(subjects)} subjects, {len(styles)} styles"
        )
    first: dict[int, int] = {}
    for i, m in enumerate(modules):
        j = first.setdefault(id(m), i)
        if j != i:
            raise ValueError(f"fuse_modules: module {i} is the same object as module {j}")
    names = list(names) if names is not None else [f"module{i}" for i in range(len(modules))]
    if len(names) != len(modules):
        raise ValueError(f"fuse_modules: {len(names)} names for {len(modules)} modules")
    for i, (c, s) in enumerate(zip(subjects, styles)):
        for role, item in (("subject", c), ("style", s)):
            ok = isinstance(item, (tuple, list)) and len(item) == 3
            if not (ok and isinstance(item[0], torch.Tensor) and isinstance(item[1], torch.Tensor)):
                raise TypeError(
                    f"fuse_module: {names[i]} {role} LoRA must be an (A, B, scale) triple with tensors A and B"
                )
    layers = [LayerLoRAs(n, tuple(c), tuple(s)) for n, c, s in zip(names, subjects, styles)]
    for module, layer in zip(modules, layers):
        for role, (A, B, _) in (("subject", layer.subject), ("style", layer.style)):
            if A.dim() != 2 or B.dim() != 2 or A.shape[-1] != module.in_features or B.shape[0] != module.out_features:
                raise ValueError(
                    f"fuse_module: {layer.name} {role} LoRA is ({B.shape[0]} x {A.shape[-1]}) but the linear is "
                    f"({module.out_features} x {module.in_features})"
                )
    return ModuleFusion(modules, get_method(method, **options), layers, backend, weights, log_gates, gate_log_sink)


def fuse_module(
    module: nn.Linear,
    subject: LoRATriple,
    style: LoRATriple,
    method: str = "merge",
    *,
    backend: str = "auto",
    weights: str = "scratch",
    log_gates: bool | str | int = True,
    gate_log_sink: Callable[[list[dict]], None] | str | os.PathLike[str] | None = None,
    **options: Any,
) -> ModuleFusion:
    """Patch one ``nn.Linear`` with a subject and a style LoRA ``(A (r, in), B (out, r), scale)``.

    ``method`` and ``options`` as :func:`lorafuse.fusion.get_method`. ``weights`` as in
    :func:`lorafuse.accelerate_fusion`: where the merged weight of a method whose gates are fixed
    within a step lives, "scratch" (default; a copy, W untouched), "inplace" (written into W, the
    original kept in host memory and written back by ``remove()``) or "off" (the fused low-rank
    path on every call). ``log_gates``: what ``gate_log`` keeps of the calls' decisions: True
    (default) the current sampling run (the calls since the last :meth:`ModuleFusion.new_run`: call
    it once per generation to keep memory flat), "all" everything, an int N the last N steps, False
    nothing. ``gate_log_sink``: a callable taking a list of entries, or a file path (one JSON line
    per entry appended), that gets every record when its step ends (also with ``log_gates=False``).
    Returns a :class:`ModuleFusion`.
    """
    return fuse_modules([module], [subject], [style], method, backend=backend, weights=weights,
                        log_gates=log_gates, gate_log_sink=gate_log_sink, **options)
