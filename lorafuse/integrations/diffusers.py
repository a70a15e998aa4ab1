"""diffusers integration: ``accelerate_fusion(pipe, subject=..., style=..., method=...)``.

Design (research/diffusers.md, option A): the PEFT ``lora.Linear`` layers stay in the module tree and
get an *instance* ``forward`` that reads the live PEFT state on every call (active adapters,
``scaling`` floats or 0-d tensors, the per-call ``scale`` diffusers applies by mutating ``scaling``,
``disable_adapters``, ``merged``) and calls ``method.layer_forward`` with the layer's two LoRAs packed
once (re-packed only when the scalings or the weights change; the check compares Python floats and
tensor version counters on the host, no device sync). A call the fused path cannot take falls back,
layer by layer, with one warning per reason, to a slower way to the method's own result (PEFT's
forward with the method's gates; kl's decision from PEFT's pieces; the fused path on a cast weight
under layerwise casting), or to PEFT's forward as it is where the user's PEFT state decides
(adapters disabled, merged, changed). LoRA layers the kernels do not patch (conv, single-adapter)
follow the ``coverage`` policy (:meth:`FusionHandle._cover`).

A forward pre-hook on each denoiser turns the timestep it receives into the progress ``tau`` in [0, 1]
(0 = noisiest) and calls ``method.begin_step``; ``tau`` stays a device tensor when the timestep is one
(a CPU timestep is read on the host: the static methods then decide on the host, bit-identically).

This file holds the installation, the per-call paths and the fallbacks. Beside it, each with one job:
``discovery`` (denoisers and their LoRA layers), ``timestep`` (timestep -> tau), ``peft_state``
(a PEFT layer's weights, the keys that say whether packs / merged weights are current, diffusers'
hooks on it), ``merged`` (merged weights), ``gate_log`` (the decisions), ``replay`` (PEFT's forward
driven by decisions), ``offload`` (offloading hooks).

diffusers and PEFT are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..fusion.base import FusionMethod
from ..guidance.config import GuidanceConfig
from ..guidance.hook import GuidanceHandle
from .compat import lora_variants
from .discovery import (
    _adapter_layers, _execution_rank, _find_denoisers, _lora_layers, _peft_classes, _unwrap, _why_unpatched,
)
from .gate_log import GateLog
from .offload import has_own_offload_hook
from .peft_state import (
    _CAST_HOOK, _casts_to, _compile_key, _diffusers_slot, _flat_conv_lora, _real_weight, _scale_key, _scales_key,
    _weight_key,
)
from .replay import _decide_and_select
from .timestep import _progress_of, _timestep_divisor, _timestep_position

__all__ = ["FusionHandle", "FusionFallbackWarning", "accelerate_fusion", "remove_fusion"]

_HANDLE_ATTR = "_lorafuse_fusion_handle"
_log = logging.getLogger("lorafuse")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fallback reasons where the user's own PEFT state decides what the layer computes: PEFT's forward as
# it is (every other fallback runs PEFT's forward driven with the method's gates for that call)
_DISABLED = "adapters disabled"
_MERGED = "adapters merged"  # pipe.fuse_lora() after accelerate_fusion: PEFT's merged sum, warned once
_MIXED_BATCH = "adapter_names= (mixed-batch) call"
_NOT_STARTED = "called outside a denoiser call (no timestep yet)"
_DELETED = "adapter deleted from the layer"
_ADAPTERS_CHANGED = "not exactly the two fused adapters active (set_adapters changed)"
_USERS_CHOICE = (_DISABLED, _MERGED, _MIXED_BATCH, _NOT_STARTED, _DELETED, _ADAPTERS_CHANGED)
# diffusers' enable_layerwise_casting: the base weight is stored in another dtype and cast for each
# call; the fused path then runs on a cast copy (what the hook computes with), not PEFT's forward
_CAST = "layerwise casting (fused path on the weight cast to the compute dtype)"
COVERAGES = ("method", "peft", "none")  # accelerate_fusion(coverage=...)
_SILENT = (_DISABLED,)  # the base layer is what PEFT gives: no warning
_MISSING = object()
# enable_group_offload(offload_type="leaf_level"): the weights are onloaded by the forwards of the
# layer's own leaves, which only PEFT's forward calls (see integrations/offload.py)
_LEAF_OFFLOAD = "weights onloaded by their own hooks (leaf-level group offloading)"


class FusionFallbackWarning(UserWarning):
    """A patched layer ran PEFT's own forward instead of the fused path (one warning per reason)."""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


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


@torch._dynamo.disable
def _pack_eager(h, rec, m, x):
    return h._packed(rec, m, x)


@torch._dynamo.disable
def _fallback_eager(h, rec, m, reason, x, args, kwargs):
    """A fallback inside a compiled graph (DoRA, offload, layerwise casting, ...): run eagerly, as
    outside one, so the result stays the method's (one graph break per such layer call)."""
    h._hand_back(rec)
    return h._fallback_forward(rec, m, reason, x, args, kwargs)


@torch._dynamo.disable
def _leave_merged(h):
    """A compiled graph runs the fused path on the original weights: give every layer its original
    back (in place mode) and stop merging for this installation."""
    if h._merged is not None:
        h._merged.release([rec.base.weight for rec in h._layers])
        h._merged = None
        for rec in h._layers:
            rec.fp = None


class _Layer:
    __slots__ = (
        "index", "component", "path", "module", "base", "forward", "merge_guard", "cache", "ccache",
        "install_weights", "stale_warned", "fp", "state", "packed", "merged",
    )

    def __init__(self, index, component, path, module):
        self.index = index
        self.component = component
        self.path = path
        self.module = module
        self.base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        self.forward = None
        self.merge_guard = None  # in place mode: PEFT's merge() restores the original first
        self.cache: dict = {}
        self.ccache: dict = {}
        self.install_weights = None
        self.stale_warned = False
        self.fp = None  # the state the last full check passed in (see FusionHandle._fingerprint)
        self.state = None  # its LoRA modules and factor versions at the last run start (FusionHandle._state_key)
        self.packed = None  # fused path: the PackedLoRA of that state
        self.merged = False  # merged path: the layer runs F.linear on its merged weight


# ------------------------------------------------------------------------------------------------
# the handle
# ------------------------------------------------------------------------------------------------
class FusionHandle:
    """What :func:`accelerate_fusion` installed; :meth:`remove` undoes it exactly (idempotent).

    Attributes:
        method: the :class:`~lorafuse.fusion.base.FusionMethod` driving the gates.
        subject, style: the adapter names. backend: the kernel backend passed to the method.
        layer_names: module paths of the patched layers, in method layer-index order.
        fallbacks: reason -> number of layer calls that left the fused / merged path for that reason.
        calls: denoiser calls seen since installation.
        guidance: the :class:`~lorafuse.guidance.GuidanceHandle` of ``accelerate_fusion(guidance=...)``.

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
    guidance: GuidanceHandle | None
    progress: bool

    def __init__(self, pipe, denoisers, method, subject, style, backend, log_gates, scheduler, timestep_divisor,
                 weights="scratch"):
        self._denoisers = denoisers
        self.method = method
        self.subject = subject
        self.style = style
        self.backend = backend
        self.weights = weights
        self._merged = None  # MergedWeights when the method's gates are fixed within a denoiser call
        self._host_gates = False  # merged path with gates known on the host per layer call (official tau)
        self.log_gates = bool(log_gates)
        self._pipe = None if isinstance(pipe, nn.Module) else weakref.ref(pipe)
        self._scheduler = scheduler
        self._timestep_divisor = timestep_divisor
        self._divisor_fixed = False  # True when the user passed timestep_divisor
        self._layers: list[_Layer] = []
        self._hooks = []
        self._activated: list[tuple[Any, Any, Any]] = []  # (module, saved _active_adapter, list we set)
        self.fallbacks: dict[str, int] = {}
        self._warned: set[str] = set()
        self._removed = False
        self._suspended = False  # see suspended()
        self._started = False
        self.calls = 0
        self._run_step = 0
        self._run_marker = None
        self._gates = GateLog(method, self._layers)  # the decisions of every layer call (gate_log)
        self._log_add = None  # this denoiser call's recorder, add(layer_index) (GateLog.begin_call), or None
        self.guidance = None  # a lorafuse.guidance.GuidanceHandle when accelerate_fusion(guidance=...)
        self._unpatched: list[tuple[str, str]] = []  # (module path, why) of LoRA layers left on PEFT
        self._reload_watch = None  # (pipe, our load_lora_weights) while installed
        self._offload_watch: list = []  # (pipeline or denoiser, method name, our wrapper): see offload.py
        self.progress = False  # a progress bar for the method's preparation (accelerate_fusion(progress=...))
        self._te_scaled: list[tuple[Any, str, Any, Any]] = []  # (text-encoder layer, adapter, saved, ours)
        self._hook_slots: list[tuple[Any, str, Any, Any]] = []  # (diffusers hook fn ref, attribute, saved, ours)
        self.coverage = "method"  # accelerate_fusion(coverage=...): LoRA layers the kernels do not patch
        self._covered: list[tuple[Any, Any]] = []  # (unpatched layer, the forward that applies the method's rule)
        self._rule_paths: set[str] = set()  # unpatched layers that follow the method's rule (see _cover)
        self._none_paths: set[str] = set()  # unpatched layers run with no adapter (coverage="none")
        self._cover_scores: dict[str, tuple[Any, tuple[float, float]]] = {}  # path -> (conv layer, klora/est scores)

    # ---------------- public ----------------
    @property
    def active(self) -> bool:
        return not self._removed

    @property
    def layer_names(self) -> list[str]:
        return [r.path for r in self._layers]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def gate_log(self) -> list[dict[str, Any]]:
        """One dict per (layer, layer call inside a denoiser call), converted to Python lazily."""
        return self._gates.entries()

    def clear_gate_log(self) -> None:
        self._gates.clear()

    def plot_gates(self, path: str | os.PathLike[str], *, which: str = "subject") -> None:
        """Write a PNG heatmap, layers (rows, module paths) x denoising steps (columns, from 1), of
        the ``which`` gate: 1 = that LoRA acts, 0 = it does not (per-sample gates are averaged); see
        :func:`lorafuse.integrations.gate_plot.plot_gate_log`."""
        from .gate_plot import plot_gate_log

        if which not in ("subject", "style"):
            raise ValueError(f"plot_gates: which must be 'subject' or 'style', got {which!r}")
        log = self.gate_log
        if not log:
            raise ValueError("plot_gates: the gate log is empty (run the pipeline with log_gates=True first)")
        plot_gate_log(log, path, which=which, layer_names=self.layer_names,
                      title=f"{getattr(self.method, 'name', 'fusion')}: {which} gate")

    def remove(self) -> None:
        """Undo everything (instance forwards, hooks, active adapters). Idempotent; safe after
        ``pipe.unload_lora_weights()`` / ``delete_adapters``."""
        if self._removed:
            return
        self._removed = True
        if self.guidance is not None:
            self.guidance.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._offload_watch:
            from .offload import unwatch

            unwatch(self._offload_watch)
        if self._reload_watch is not None:
            pipe, fn = self._reload_watch
            if pipe.__dict__.get("load_lora_weights") is fn:
                del pipe.__dict__["load_lora_weights"]
            self._reload_watch = None
        if self._merged is not None:  # in place mode: every original back, bit for bit
            self._merged.release([_real_weight(rec.base) if rec.base is not None else None for rec in self._layers])
            self._merged = None
        for rec in self._layers:
            m = rec.module
            if rec.merge_guard is not None and m.__dict__.get("merge") is rec.merge_guard:
                del m.__dict__["merge"]
            if rec.forward is None:  # an install that failed before this layer was patched
                continue
            if m.__dict__.get("forward") is rec.forward:
                del m.__dict__["forward"]
            elif getattr(m, "_old_forward", None) is rec.forward:  # an accelerate hook was added on top
                m._old_forward = type(m).forward.__get__(m)
        self._unhook_diffusers()
        for m, fwd in self._covered:
            if m.__dict__.get("forward") is fwd:
                del m.__dict__["forward"]
        self._covered.clear()
        for m, saved, ours in self._activated:
            if m.__dict__.get("_active_adapter") is ours:
                if saved is _MISSING:
                    del m.__dict__["_active_adapter"]
                else:
                    m._active_adapter = saved
        self._activated.clear()
        for m, a, saved, ours in self._te_scaled:
            if m.scaling.get(a) == ours:  # not changed since (set_adapters would have reset it)
                m.scaling[a] = saved
        self._te_scaled.clear()
        for _, d in self._denoisers:
            if d.__dict__.get(_HANDLE_ATTR) is self:
                del d.__dict__[_HANDLE_ATTR]

    def _unhook_diffusers(self) -> None:
        """Take our forwards out of diffusers' hook chains: where :meth:`_install` put them, and where a
        hook added after installation (``enable_layerwise_casting``) wrapped them."""
        for ref, attr, saved, ours in self._hook_slots:
            if getattr(ref, attr, None) is ours:
                setattr(ref, attr, saved)
        self._hook_slots.clear()
        for rec in self._layers:
            registry = rec.module.__dict__.get("_diffusers_hook")
            for ref in getattr(registry, "_fn_refs", None) or ():
                for attr in ("original_forward", "forward"):
                    if rec.forward is not None and getattr(ref, attr, None) is rec.forward:
                        setattr(ref, attr, type(rec.module).forward.__get__(rec.module))

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

    # ---------------- installation ----------------
    def _install(self) -> None:
        s, t = self.subject, self.style
        LoraLayer = _peft_classes()
        entries = []
        for comp, d in self._denoisers:
            d = _unwrap(d)  # compiled before accelerate_fusion: patch the compiled module's layers
            for path, mod in _lora_layers(d, (s, t)):
                entries.append((_execution_rank(path, d), len(entries), comp, path, mod))
        if not entries:
            raise ValueError(
                f"accelerate_fusion: the adapters {s!r} and {t!r} target no common linear layer in "
                f"{', '.join(c for c, _ in self._denoisers)}; nothing to fuse"
            )
        entries.sort(key=lambda e: (e[0], e[1]))
        fused = [f"{comp}.{path}" for _, _, comp, path, mod in entries if set(mod.merged_adapters) & {s, t}]
        if fused:
            raise ValueError(
                f"accelerate_fusion: the adapters are fused into the weights of {len(fused)} layers (first: {fused[0]}; "
                "pipe.fuse_lora()): the method cannot select between them; call pipe.unfuse_lora() first"
            )
        patched = {id(e[4]) for e in entries}
        uncovered = []
        for comp, d in self._denoisers:
            for path, mod in _adapter_layers(_unwrap(d), (s, t)):
                if id(mod) not in patched:
                    self._unpatched.append((f"{comp}.{path}", _why_unpatched(mod, s, t)))
                    uncovered.append((f"{comp}.{path}", mod))
        for comp, d in self._denoisers:  # activate both adapters everywhere in the denoiser, remember state
            for _, mod in d.named_modules():
                if isinstance(mod, LoraLayer) and (s in getattr(mod, "lora_A", {}) or t in getattr(mod, "lora_A", {})):
                    cur = mod.active_adapters
                    if list(cur) != [s, t]:
                        ours = [s, t]
                        saved = mod.__dict__.get("_active_adapter", _MISSING)
                        mod._active_adapter = ours
                        self._activated.append((mod, saved, ours))
        self._layers[:] = [_Layer(i, comp, path, mod) for i, (_, _, comp, path, mod) in enumerate(entries)]
        self._prepare_method()
        for rec in self._layers:
            m = rec.module
            w = m.get_base_layer().weight if hasattr(m, "get_base_layer") else None
            if isinstance(w, torch.Tensor) and not w.is_meta and w.dtype in _KERNEL_DTYPES and (
                    m.lora_A[s].weight.device == w.device):
                self._packed(rec, m, w)  # pack once now (a compiled graph then finds it)
            slot = _diffusers_slot(m) if "forward" in m.__dict__ else None
            if "forward" in m.__dict__ and slot is None:
                self._warn_once("layer already has an instance forward (another hook): left on PEFT")
                self._unpatched.append((f"{rec.component}.{rec.path}", "already has an instance forward (another hook)"))
                continue
            rec.forward = self._make_forward(rec)
            if slot is None:
                m.forward = rec.forward
            else:  # diffusers' hooks (enable_layerwise_casting) wrap the layer: ours goes innermost
                ref, attr = slot
                self._hook_slots.append((ref, attr, getattr(ref, attr), rec.forward))
                setattr(ref, attr, rec.forward)
            if self._merged is not None and self._merged.mode == "inplace" and "merge" not in m.__dict__:
                rec.merge_guard = self._make_merge_guard(rec)
                m.merge = rec.merge_guard
        self._cover(uncovered)
        for comp, d in self._denoisers:
            pos = _timestep_position(_unwrap(d))
            self._hooks.append(d.register_forward_pre_hook(self._make_pre_hook(pos), with_kwargs=True))
            d.__dict__[_HANDLE_ATTR] = self

    def _cover(self, uncovered) -> None:
        """Apply the coverage policy to the two adapters' LoRA layers the kernels do not patch (conv
        LoRAs: SD1.5's 1x1 ``proj_in``/``proj_out``, kohya LoCon; layers only one adapter targets).

        ``coverage="peft"``: left as they are, PEFT's sum of the active adapters (what plain loading
        gives). ``coverage="none"``: neither adapter acts there, PEFT's forward with no adapter active
        (the base layer), as in the official K-LoRA code, which applies no LoRA outside the attention
        linears it patches. ``coverage="method"`` (default): the method's rule, through PEFT's own
        forward of the layer (exact for DoRA):

        - constant gates (merge, subject, style): PEFT with each adapter's scaling times its weight,
          as ``set_adapters([subject, style], [w_c, w_s])`` does on every layer;
        - klora / est (static selection), conv layers with both adapters: the layer's own scores
          from its flattened deltas (A (r, C_in kh kw), B (C_out, r) when B is 1x1), the installed
          gamma and this step's S(tau): one adapter per step, as on the patched layers;
        - kl, conv layers with both adapters: the per-sample KL rule on the layer's PEFT outputs,
          output channels as the softmax axis and every pixel a token;
        - a layer only one adapter targets, under a selecting method (klora, est, kl): the rule
          with the absent adapter's delta 0 selects the present one (kl: unless its KL is exactly
          0, a delta that shifts every channel equally), i.e. PEFT's forward as it is;
        - anything else (a method with no rule outside its prepared layers, a conv B that is not
          1x1, a layer another hook already wraps): PEFT's sum, reported as such.

        These layers are not in the gate log (it is indexed by the method's layers). Their klora / est
        scores are computed here, at install, and again after a hotswap (:meth:`_rescore_cover`)."""
        from ..fusion._common import StaticSelectMethod
        from ..fusion.merge import ConstantGates

        s, t = self.subject, self.style
        method = self.method
        selecting = isinstance(method, StaticSelectMethod) or hasattr(method, "decide_from_outputs")
        for path, m in uncovered:
            if self.coverage == "peft":
                continue
            both = s in m.lora_A and t in m.lora_A
            rule = None
            if self.coverage == "none":
                rule = ("gates", (0.0, 0.0))
            elif isinstance(method, ConstantGates):
                rule = ("gates", tuple(method._weights))
            elif not both and selecting:
                self._rule_paths.add(path)  # the present adapter acts: PEFT's forward as it is
                continue
            elif both and isinstance(method, StaticSelectMethod):
                scores = self._conv_scores(m)
                if scores is not None:
                    self._cover_scores[path] = (m, scores)
                    rule = ("static", path)
            elif both and hasattr(method, "decide_from_outputs"):
                rule = ("dynamic", None)
            if rule is None:
                continue
            fwd = self._make_cover_forward(m, rule)
            if "forward" not in m.__dict__:
                m.forward = fwd
            else:
                slot = _diffusers_slot(m)
                if slot is None:
                    continue  # another hook owns the layer's forward: PEFT's sum
                ref, attr = slot
                self._hook_slots.append((ref, attr, getattr(ref, attr), fwd))
                setattr(ref, attr, fwd)
            self._covered.append((m, fwd))
            (self._none_paths if self.coverage == "none" else self._rule_paths).add(path)

    def _conv_scores(self, m):
        """klora / est's (score_c, score_s) of conv LoRA layer ``m`` from its flattened deltas, as
        they are now; None when a B is not a 1x1 kernel."""
        pair = [_flat_conv_lora(m, a) for a in (self.subject, self.style)]
        return None if None in pair else self.method.layer_scores(*pair)

    def _rescore_cover(self) -> None:
        """After a reload of an adapter (hotswap): the covered conv layers' scores from the new factors
        (the patched layers' are re-prepared by :meth:`_prepare_method`)."""
        for path, (m, old) in list(self._cover_scores.items()):
            scores = self._conv_scores(m)
            self._cover_scores[path] = (m, old if scores is None else scores)

    def _make_cover_forward(self, m, rule):
        """The forward of an unpatched LoRA layer under ``coverage="method"`` (see :meth:`_cover`).
        Outside a denoiser call, with extra forward arguments, or when the user's PEFT state decides
        (adapters disabled, merged, another set of adapters active): PEFT's forward as it is."""
        ref = weakref.ref(self)
        cls_forward = type(m).forward
        kind, data = rule

        def forward(x, *args, **kwargs):
            h = ref()
            if (h is None or h._removed or h._suspended or not h._started or args or kwargs or m.disable_adapters
                    or m.merged):
                return cls_forward(m, x, *args, **kwargs)
            names = (h.subject, h.style)
            held = [a for a in names if a in m.lora_A]
            if sorted(a for a in m.active_adapters if a in m.lora_A) != sorted(held):
                return cls_forward(m, x, *args, **kwargs)
            from .replay import peft_adapter_outputs, peft_forward_with_gates, select_per_sample

            if kind == "gates":
                return peft_forward_with_gates(m, x, data, names)
            if kind == "dynamic":
                return _decide_and_select(h.method, m, x, names, None, (), {})
            gates = h.method.extra_gates(*h._cover_scores[data][1])
            _, ys, _ = peft_adapter_outputs(m, x, names)
            return select_per_sample(gates.reshape(1, 2).to(ys[0].device), ys)

        return forward

    def _prepare_method(self) -> None:
        """Give the method every patched layer's two LoRAs as they are now (``prepare``) and set up
        the merged weights; at install, and again when an adapter is reloaded (hotswap)."""
        from ..fusion.base import FusionMethod, LayerLoRAs

        from .offload import disk_copies

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
            rec.install_weights = self._weights_versions(mod)
            rec.stale_warned, rec.fp, rec.packed = False, None, None
            rec.cache.clear()
            rec.ccache.clear()
        w0 = loras[0].subject[0]
        if self.progress and self.method.progress is None:
            self.method.progress = _progress_bar(f"lorafuse: {getattr(self.method, 'name', 'fusion')} statistics")
        self.method.prepare(loras, None if w0.is_meta else w0.device)
        if self._merged is not None:
            self._merged.release([rec.base.weight for rec in self._layers])
            self._merged = None
        if (self.weights != "off" and not self.method.dynamic
                and type(self.method).layer_gates is not FusionMethod.layer_gates):
            from .merged import MergedWeights

            self._merged = MergedWeights(len(self._layers), self.weights, self.backend)
            self._host_gates = self.method.step_decisions() is None  # official tau: per-call host gates

    def _weight_text_encoders(self, pipe) -> None:
        """Constant-gate methods (merge, subject, style) weight the text encoders' LoRAs too, as
        ``set_adapters([subject, style], [w_c, w_s])`` does: each text-encoder LoRA layer's scaling of
        adapter i is multiplied by w_i (restored on ``remove()``). The selecting methods leave the
        text encoders as loaded: they run once per prompt, and the methods decide per denoiser layer."""
        from ..fusion.merge import ConstantGates

        if not isinstance(self.method, ConstantGates):
            return
        LoraLayer = _peft_classes()
        weights = dict(zip((self.subject, self.style), self.method._weights))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            te = getattr(pipe, name, None)
            if not isinstance(te, nn.Module):
                continue
            for _, m in te.named_modules():
                if not isinstance(m, LoraLayer):
                    continue
                for a, w in weights.items():
                    if a in m.scaling and w != 1.0:
                        saved = m.scaling[a]
                        m.scaling[a] = saved * w
                        self._te_scaled.append((m, a, saved, m.scaling[a]))

    def _watch_reloads(self, pipe) -> None:
        """``pipe.load_lora_weights(..., adapter_name=<subject or style>, hotswap=True)`` copies new
        factors into the adapter's tensors in place (invisible to version counters): re-prepare the
        method, the packed factors and the merged weights right after it."""
        ref = weakref.ref(self)
        cls_load = type(pipe).load_lora_weights

        def load_lora_weights(*args, **kwargs):
            out = cls_load(pipe, *args, **kwargs)
            name = kwargs.get("adapter_name", args[1] if len(args) > 1 else None)
            h = ref()
            if h is not None and not h._removed and name in (h.subject, h.style):
                h._prepare_method()
                h._rescore_cover()
            return out

        self._reload_watch = (pipe, load_lora_weights)
        pipe.load_lora_weights = load_lora_weights

    def _watch_offload(self, pipe) -> None:
        """Before offloading is enabled on the pipeline or a denoiser (it copies the weights as they
        are), in place mode hands every original weight back; the next call merges again."""
        from .offload import watch_offload

        ref = weakref.ref(self)

        def hand_back() -> None:
            h = ref()
            if h is not None and not h._removed:
                for rec in h._layers:
                    h._hand_back(rec)

        objects = ([] if isinstance(pipe, nn.Module) else [pipe]) + [_unwrap(d) for _, d in self._denoisers]
        self._offload_watch = watch_offload(objects, hand_back)

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
        - ``fallback_calls``: reason -> layer calls that left the fused / merged path so far (see
          :attr:`fallbacks`)."""
        unpatched: dict[str, int] = {}
        by_policy: dict[str, dict[str, int]] = {"method_gates": {}, "peft_sum": {}, "no_lora": {}}
        for path, why in self._unpatched:
            unpatched[why] = unpatched.get(why, 0) + 1
            part = by_policy["method_gates" if path in self._rule_paths else
                             "no_lora" if path in self._none_paths else "peft_sum"]
            part[why] = part.get(why, 0) + 1
        cast = 0
        for rec in self._layers:
            base = rec.base
            w = getattr(base, "weight", None)
            if rec.forward is not None and isinstance(w, torch.Tensor) and _CAST_HOOK in getattr(
                    getattr(base, "_diffusers_hook", None), "hooks", {}):
                cast += 1
        return {
            "method": getattr(self.method, "name", type(self.method).__name__),
            "layers": sum(rec.forward is not None for rec in self._layers),
            "path": "merged" if self._merged is not None else "fused",
            "weights": self.weights if self._merged is not None else None,
            "cast_layers": cast,
            "coverage": self.coverage,
            "unpatched": unpatched,
            **by_policy,
            "unpatched_layers": [p for p, _ in self._unpatched],
            "fallback_calls": dict(self.fallbacks),
        }

    def _weights_versions(self, m) -> tuple[int, ...]:
        """Version counters of the layer's four LoRA factors: they move with in-place writes, not with
        ``pipe.to(dtype / device)`` or offload moves (no false "weights changed" warning on those)."""
        s, t = self.subject, self.style
        return tuple(w._version for w in (m.lora_A[s].weight, m.lora_B[s].weight, m.lora_A[t].weight,
                                          m.lora_B[t].weight))

    def _weights_key(self, m):
        s, t = self.subject, self.style
        return (_weight_key(m.lora_A[s].weight), _weight_key(m.lora_B[s].weight),
                _weight_key(m.lora_A[t].weight), _weight_key(m.lora_B[t].weight))

    # ---------------- per denoiser call ----------------
    def _make_pre_hook(self, pos):
        from ..fusion.base import Progress

        ref = weakref.ref(self)

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
            sched = h._live_scheduler(module)
            t0, tau = _progress_of(ts, h._timestep_divisor)
            marker = getattr(sched, "timesteps", None) if sched is not None else None
            if marker is not h._run_marker or not h._started:  # set_timesteps() ran: a new sampling run
                h._run_marker = marker
                h._run_step = 0
                h.method.reset()
                h._check_states()
            num_steps = getattr(sched, "num_inference_steps", None) if sched is not None else None
            h.method.begin_step(Progress(tau=tau, step=h._run_step, num_steps=num_steps, timestep=ts))
            if h._merged is not None and not h._host_gates:  # rebuild the layers whose gates flipped
                h._merged.step(h.method.step_decisions().gates)
            h._log_add = h._gates.begin_call(h.calls, t0, tau) if h.log_gates else None
            h._run_step += 1
            h.calls += 1
            h._started = True
            return None

        return pre_hook

    def _live_scheduler(self, denoiser):
        """The pipeline's scheduler now (a swapped scheduler is followed at the next denoiser call,
        with its own num_train_timesteps unless the user fixed timestep_divisor)."""
        pipe = self._pipe() if self._pipe is not None else None
        sched = getattr(pipe, "scheduler", None) if pipe is not None else self._scheduler
        if sched is not self._scheduler:
            self._scheduler = sched
            self._run_marker = _MISSING  # a new scheduler starts a new run
            if not self._divisor_fixed:
                self._timestep_divisor = _timestep_divisor(_unwrap(denoiser), sched)
        return sched

    # ---------------- per layer call ----------------
    def _make_forward(self, rec: _Layer):
        ref = weakref.ref(self)
        m = rec.module
        cls_forward = type(m).forward
        index = rec.index
        linear = F.linear
        params = rec.base._parameters if rec.base is not None else {}

        def forward(x, *args, **kwargs):
            h = ref()
            if h is None or h._removed:
                return cls_forward(m, x, *args, **kwargs)
            if h._suspended:
                h._hand_back(rec)
                return cls_forward(m, x, *args, **kwargs)
            if torch.compiler.is_compiling():  # traced: no host bookkeeping, no graph breaks
                if h._merged is not None:
                    _leave_merged(h)  # one graph break, once: compiled graphs run the fused path
                reason = h._check(m, x, args, kwargs)
                if reason is not None:
                    if reason in _USERS_CHOICE:  # PEFT's own forward is the result: traced as is
                        return cls_forward(m, x, *args, **kwargs)
                    return _fallback_eager(h, rec, m, reason, x, args, kwargs)  # the method's result
                packed = rec.ccache.get((_compile_key(m.scaling[h.subject]), _compile_key(m.scaling[h.style]),
                                         x.dtype))
                if packed is None:
                    packed = _pack_eager(h, rec, m, x)
                base = m.get_base_layer()
                return h.method.layer_forward(index, x, base.weight, base.bias, packed, backend=h.backend)
            fp = h._fingerprint(rec, m, x) if not (args or kwargs) else None
            if fp is None or fp != rec.fp:  # something changed since the last full check: check again
                reason = h._check(m, x, args, kwargs)
                if reason is not None:
                    h._hand_back(rec)
                    return h._fallback_forward(rec, m, reason, x, args, kwargs)
                h._prepare_layer(rec, m, x)
                rec.fp = fp
            if rec.merged:
                merged = h._merged
                if h._host_gates:  # official tau: this call's gates are known on the host
                    row, key = h.method.layer_gates(index)
                    if key is None:  # a method with neither step_decisions() nor host keys: fused path
                        return h._unmergeable(rec, m, x, row)
                    if key != merged.layers[index].gate_key:
                        h._build(rec, m, row, key)
                y = linear(x, merged.layers[index].dst, params.get("bias"))
            else:
                y = h.method.layer_forward(index, x, params["weight"], params.get("bias"), rec.packed,
                                           backend=h.backend)
            add = h._log_add
            if add is not None:
                add(index)
            return y

        return forward

    def _fingerprint(self, rec: _Layer, m, x):
        """What the full check (:meth:`_check`) and the layer's packed / merged state depend on and
        diffusers / PEFT change between or inside denoiser calls, as a flat tuple compared by value:
        adapters disabled / merged / active, train mode, the live scalings (diffusers scales them
        inside the denoiser's forward), the base weight's identity and memory (moves, offload hooks)
        and the input dtype. When it equals the one of the last full check, the call skips both.
        The LoRA modules' identities and the factors' version counters are checked once per sampling
        run instead (:meth:`_check_states`, which clears ``rec.fp`` on a change). None (autograd
        enabled, an adapter's scaling gone): check every call. Written for speed: it runs on every
        layer call and reads only what the layer's own forward touches anyway (inside a denoiser
        call the interpreter's caches are cold: every other object read costs ~0.5-1 us)."""
        if torch.is_grad_enabled():
            return None
        sc = m.scaling
        try:
            c_s, c_t = sc[self.subject], sc[self.style]
        except KeyError:
            return None
        if type(c_s) is not float or type(c_t) is not float:  # 0-d tensor scalings: by identity and version
            c_s, c_t = _scale_key(c_s), _scale_key(c_t)
        w = rec.base._parameters.get("weight")
        active = m._active_adapter
        return (m._disable_adapters, len(m.merged_adapters), tuple(active) if type(active) is list else active,
                m.training, c_s, c_t, x.dtype, id(w), w.data_ptr() if w is not None else None)

    def _state_key(self, rec: _Layer):
        """The rest of a layer's state the packed / merged state depend on: the identities of the
        bias and the LoRA modules, the base dtype and the LoRA factors' version counters (in-place
        writes; objects by id). None: an adapter or the weight is gone."""
        m = rec.module
        s, t = self.subject, self.style
        la, lb = m._modules["lora_A"]._modules, m._modules["lora_B"]._modules
        try:
            a_s, b_s, a_t, b_t = la[s], lb[s], la[t], lb[t]
        except KeyError:
            return None
        params = rec.base._parameters
        w = params.get("weight")
        if w is None:
            return None
        return (w.dtype, id(params.get("bias")), id(a_s), id(b_s), id(a_t), id(b_t), *self._weights_versions(m))

    def _check_states(self) -> None:
        """At the first denoiser call of each sampling run (pre-hook): every layer whose state key
        changed since the last check gets a full check at its next call (``rec.fp`` cleared). Once
        per run, not per call: it reads every layer's LoRA modules, which costs ~20 us per layer
        with the caches a denoiser call leaves behind."""
        for rec in self._layers:
            key = self._state_key(rec)
            if key is None or key != rec.state:
                rec.state = key
                rec.fp = None

    def _prepare_layer(self, rec: _Layer, m, x) -> None:
        """After a passed full check: put the layer on the merged path (building its weight unless
        the gates are host-side and the call builds it) or pack its LoRAs for the fused path."""
        self._check_stale(rec, m)
        if self._merged is not None:
            rec.merged = True
            weight, loras, pack_key = self._merge_inputs(rec, m)
            if self._merged.current(rec.index, weight, pack_key):
                return
            if not self._host_gates:  # device-side gates: build now with this step's row
                self._merged.build(rec.index, weight, loras, pack_key, self.method.step_decisions().gates[rec.index],
                                   None)
            else:
                self._merged.restore(rec.index, weight)  # the call builds it with its own gates
            return
        rec.merged = False
        rec.packed = self._packed(rec, m, x)

    def _merge_inputs(self, rec: _Layer, m):
        """(base weight, the two (A, B, scale) triples, their key) of a layer, as they are now."""
        s, t = self.subject, self.style
        loras = [(m.lora_A[a].weight, m.lora_B[a].weight, m.scaling[a]) for a in (s, t)]
        return rec.base.weight, loras, (_scales_key(m, s, t), self._weights_key(m))

    def _build(self, rec: _Layer, m, row, key) -> None:
        weight, loras, pack_key = self._merge_inputs(rec, m)
        self._merged.build(rec.index, weight, loras, pack_key, row, key)

    def _unmergeable(self, rec: _Layer, m, x, row):
        """The method gave a device-only gates row but no per-step gates: merging cannot follow it.
        Run this call on the fused path with that row and every later call through the method."""
        from ..kernels import fused_lora_linear

        _leave_merged(self)
        y = fused_lora_linear(x, rec.base.weight, rec.base.bias, self._packed(rec, m, x), gates=row,
                              backend=self.backend)
        self._log(rec.index)
        return y

    def _hand_back(self, rec: _Layer) -> None:
        """Before PEFT's own code runs on the layer: in place mode, its original weight back."""
        rec.fp = None
        if self._merged is not None and self._merged.mode == "inplace":  # (on meta: into accelerate's copy)
            self._merged.restore(rec.index, _real_weight(rec.base))

    def _make_merge_guard(self, rec: _Layer):
        ref = weakref.ref(self)
        m = rec.module
        cls_merge = type(m).merge

        def merge(*args, **kwargs):  # fuse_lora(): PEFT adds its deltas to the original, not to W_eff
            h = ref()
            if h is not None and not h._removed:
                h._hand_back(rec)
            return cls_merge(m, *args, **kwargs)

        return merge

    def _check_stale(self, rec: _Layer, m) -> None:
        if not rec.stale_warned and self._weights_versions(m) != rec.install_weights:
            rec.stale_warned = True
            self._warn_once("LoRA weights changed after accelerate_fusion (hotswap?): the method's static "
                            "per-layer scores are stale; call accelerate_fusion again")

    def _check(self, m, x, args, kwargs):
        """Why this call cannot take the fused path (None: it can). Host-side checks only."""
        if args or kwargs:
            return _MIXED_BATCH if "adapter_names" in kwargs else "extra forward arguments"
        if m.disable_adapters:
            return _DISABLED
        if m.merged:
            return _MERGED
        if not self._started:
            return _NOT_STARTED
        s, t = self.subject, self.style
        lora_a = m.lora_A
        if s not in lora_a or t not in lora_a:
            return _DELETED
        act = [a for a in m.active_adapters if a in lora_a]
        if len(act) != 2 or s not in act or t not in act:
            return _ADAPTERS_CHANGED
        variants = lora_variants(m)
        if variants and (s in variants or t in variants):
            return "DoRA or another LoRA variant"
        lb = getattr(m, "lora_bias", None)
        if lb and (lb.get(s, False) or lb.get(t, False)):
            return "LoRA bias"
        base = m.get_base_layer()
        if type(base) is not nn.Linear:
            return "base layer is not a plain nn.Linear (quantized or wrapped)"
        if has_own_offload_hook(base, m.lora_A[s], m.lora_B[s], m.lora_A[t], m.lora_B[t]):
            return _LEAF_OFFLOAD
        w = base.weight
        dev = x.device
        if w.device != dev:
            return "weights on meta or another device (offload)"
        if x.dtype not in _KERNEL_DTYPES:
            return f"unsupported compute dtype {x.dtype}"
        cast = w.dtype != x.dtype or (base.bias is not None and base.bias.dtype != x.dtype)
        if cast and not _casts_to(base, x.dtype):
            return "storage dtype differs from compute dtype"
        A_s, B_s, A_t, B_t = m.lora_A[s].weight, m.lora_B[s].weight, m.lora_A[t].weight, m.lora_B[t].weight
        if A_s.device != dev or B_s.device != dev or A_t.device != dev or B_t.device != dev:
            return "weights on meta or another device (offload)"
        if m.training:
            for a in (s, t):
                d = m.lora_dropout[a]
                if isinstance(d, nn.Dropout) and d.p > 0:
                    return "LoRA dropout in training mode"
        if torch.is_grad_enabled() and (
            x.requires_grad or A_s.requires_grad or B_s.requires_grad or A_t.requires_grad or B_t.requires_grad
            or w.requires_grad
        ):
            return "autograd enabled with trainable weights"
        return _CAST if cast else None

    def _fallback_forward(self, rec: _Layer, m, reason: str, x, args, kwargs):
        """A call the fused / merged path cannot take as it is. Unless the user's own PEFT state
        decides (adapters disabled, merged, changed, ...: PEFT's forward as it is), the result is the
        method's, only slower:

        - layerwise casting (diffusers' ``enable_layerwise_casting``): the method's fused path on the
          base weight cast to the compute dtype, as the cast hook would compute with (not warned);
        - methods with per-call gates (klora, est, merge, ...): PEFT's forward with this call's
          gates (only the selected adapter active, or scalings times merge weights);
        - kl: the same per-sample decision from PEFT's own pieces (base output, each adapter's
          perturbation; :meth:`KLDynamic.decide_from_outputs`), then per sample the selected
          adapter's PEFT output (exact for DoRA), logged as the layer's decision;
        - a method with neither: PEFT's sum of both adapters, reported as such."""
        if reason == _CAST:
            return self._cast_forward(rec, m, x)
        gates = None
        dynamic = False
        if reason not in _USERS_CHOICE:
            picked = self.method.layer_gates(rec.index)
            if picked is not None:
                gates = picked[0].tolist()  # host copy: one sync on CUDA, in a fallback only
            elif hasattr(self.method, "decide_from_outputs"):
                dynamic = True
            else:
                reason += " (the method gives no per-call gates outside its fused kernel: PEFT's sum of both adapters)"
        self._fallback(reason, gated=gates is not None or dynamic)
        if dynamic:
            y = _decide_and_select(self.method, m, x, (self.subject, self.style), rec.index, args, kwargs)
        elif gates is None:
            return type(m).forward(m, x, *args, **kwargs)
        else:
            from .replay import peft_forward_with_gates

            y = peft_forward_with_gates(m, x, gates, (self.subject, self.style), *args, **kwargs)
        self._log(rec.index)
        return y

    def _cast_forward(self, rec: _Layer, m, x):
        """Layerwise casting: the method's own path on the base weight and bias cast to x's dtype (a
        transient copy per call, as diffusers' hook makes); counted in :attr:`fallbacks`, logged once."""
        self.fallbacks[_CAST] = self.fallbacks.get(_CAST, 0) + 1
        if _CAST not in self._warned:
            self._warned.add(_CAST)
            _log.info("lorafuse: %s", _CAST)
        base = m.get_base_layer()
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        y = self.method.layer_forward(rec.index, x, base.weight.to(x.dtype), bias, self._packed(rec, m, x),
                                      backend=self.backend)
        self._log(rec.index)
        return y

    def _log(self, index: int) -> None:
        """Record layer ``index``'s decision of this call in the gate log (when logging)."""
        add = self._log_add
        if add is not None:
            add(index)

    def _fallback(self, reason: str, gated: bool = False) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        if reason not in _SILENT:
            self._warn_once(reason, " with the method's gates (same result, slower)" if gated else "")

    def _warn_once(self, reason: str, how: str = "") -> None:
        if reason in self._warned:
            return
        self._warned.add(reason)
        warnings.warn(f"lorafuse: falling back to PEFT's forward{how}: {reason} (warned once per reason)",
                      FusionFallbackWarning, stacklevel=4)

    def _packed(self, rec: _Layer, m, x):
        from ..kernels import PackedLoRA

        s, t = self.subject, self.style
        A_s, B_s, A_t, B_t = m.lora_A[s].weight, m.lora_B[s].weight, m.lora_A[t].weight, m.lora_B[t].weight
        sc_s, sc_t = m.scaling[s], m.scaling[t]
        key = (*_scales_key(m, s, t), self._weights_key(m), x.dtype, x.device)
        packed = rec.cache.get(key)
        if packed is not None:
            return packed
        self._check_stale(rec, m)
        with torch.no_grad():
            packed = PackedLoRA.pack([(A_s, B_s, sc_s), (A_t, B_t, sc_t)], dtype=x.dtype, device=x.device)
        if len(rec.cache) >= 4:  # per-call `scale` alternates scalings: keep a few
            rec.cache.pop(next(iter(rec.cache)))
        rec.cache[key] = packed
        if len(rec.ccache) >= 4:
            rec.ccache.pop(next(iter(rec.ccache)))
        rec.ccache[(_compile_key(sc_s), _compile_key(sc_t), x.dtype)] = packed
        return packed


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def accelerate_fusion(
    pipe: Any,
    subject: str,
    style: str,
    method: str | FusionMethod = "klora",
    *,
    backend: str = "auto",
    log_gates: bool = True,
    timestep_divisor: float | None = None,
    guidance: GuidanceConfig | None = None,
    weights: str = "scratch",
    progress: bool | None = None,
    coverage: str = "method",
    **method_options: Any,
) -> FusionHandle:
    """Fuse the LoRA adapters ``subject`` and ``style`` of a diffusers pipeline with a fusion method.

    Args:
        pipe: a diffusers pipeline (its ``unet`` / ``transformer`` are patched; text encoders stay on
            PEFT) or a denoiser module itself.
        subject, style: adapter names given to ``pipe.load_lora_weights(..., adapter_name=...)``.
        method: "klora", "est", "kl", "merge" (see :func:`lorafuse.fusion.get_method`) or a
            :class:`~lorafuse.fusion.base.FusionMethod` instance.
        backend: kernel backend for the method ("auto", "torch", "triton").
        log_gates: record every decision in :attr:`FusionHandle.gate_log` (small device copies per
            layer call, converted when read).
        timestep_divisor: override what the denoiser's ``timestep`` is divided by to get the noise
            level (default: scheduler ``num_train_timesteps``; 1 for FLUX, whose pipeline passes t/1000).
        guidance: a :class:`lorafuse.guidance.GuidanceConfig`: also install metric-guided latent
            refinement (Cao et al.; usually with ``method="kl"``), a wrapped ``scheduler.step`` that
            ``handle.guidance`` owns and ``handle.remove()`` undoes. Needs a pipeline with a VAE.
        weights: where methods whose gates are fixed within a denoiser call (klora, est, merge,
            subject, style; official tau mode too) keep each patched layer's merged weight
            ``W + g_c dW_c + g_s dW_s``, rebuilt from the original only when the gates, scalings or
            weights change, so that a call is one ``F.linear``: "scratch" (default; a device copy
            per patched layer, the original untouched), "inplace" (written into the layer's weight,
            the original kept in host memory and written back before PEFT's own code uses the layer
            and on ``remove()``) or "off" (the fused low-rank path on every call). Dynamic methods
            (kl) always run the fused path. See :mod:`lorafuse.integrations.merged`.
        progress: show a progress bar while the method prepares its per-layer statistics, when
            that takes more than a second (None: unless the pipeline's progress bar is disabled
            with ``pipe.set_progress_bar_config(disable=True)``).
        coverage: what the two adapters' LoRA layers that the kernels do not patch compute (conv
            LoRAs: SD1.5's 1x1 ``proj_in``/``proj_out``, kohya LoCon; layers only one adapter
            targets): "method" (default) the method's rule through PEFT's own forward of the layer
            (merge weights, klora / est's selection from the layer's own scores, kl's per-sample
            decision; a single adapter acts alone under a selecting method), "peft" PEFT's sum of
            the active adapters, as loading the LoRAs gives, "none" neither adapter (the base layer:
            the official K-LoRA code's result there) (see :meth:`FusionHandle._cover`).
            ``handle.summary()`` counts the layers per policy and reason.
        **method_options: passed to ``get_method`` (pattern, alpha, beta, D, official mode, ...).

    Returns a :class:`FusionHandle`; ``handle.remove()`` or :func:`remove_fusion` undo everything.
    Calling again on the same pipeline replaces the previous installation.

    Which adapters are active: on every LoRA layer of the denoiser(s) that holds ``subject`` or
    ``style``, exactly ``[subject, style]`` (other adapters of those layers are inactive there until
    ``remove()``); the method's gates then pick per layer and step. Text encoders keep the adapters you
    activated; "merge", "subject" and "style" weight their LoRA scalings as ``set_adapters`` would.
    A :class:`~lorafuse.integrations.lora_files.LoRAAlphaWarning` says when diffusers / PEFT loaded one
    of the two adapters with other per-layer scales than its file (kohya files with per-layer alphas;
    :func:`~lorafuse.integrations.lora_files.fix_peft_alphas` repairs them).

    What falls back, and why: a patched layer call the fused / merged path cannot take runs PEFT's
    own forward (warned once per reason, counted in :attr:`FusionHandle.fallbacks`):

    - driven with the method's gates (only the selected adapter active: same result, slower) for DoRA
      or LoRA bias, a base layer that is not a plain ``nn.Linear`` (quantized), weights on meta or on
      another device than the input (accelerate's sequential offload), weights onloaded by the
      layer's own hooks (leaf-level group offloading), a storage dtype other than the
      compute dtype, autograd through trainable weights, LoRA dropout in training mode. "kl" decides
      inside its fused kernel: there PEFT applies the sum of both adapters, and the warning says so;
    - as your PEFT state says (no gates) after ``disable_lora()`` (the base layer), ``fuse_lora()``,
      ``set_adapters`` to other adapters, ``adapter_names=`` calls, a deleted adapter, and calls
      outside a denoiser call.

    LoRA layers that are never patched (conv LoRAs, layers only one of the adapters targets, layers
    that already have an instance forward, e.g. from ``enable_layerwise_casting``) apply PEFT's sum;
    :meth:`FusionHandle.summary` and one INFO line on the ``lorafuse`` logger list them per reason.

    Order with other diffusers features:

    - ``torch.compile``: before or after; the compiled module's layers are patched and a compiled
      graph runs the fused path (merged weights are handed back at the first traced call).
    - offloading: before or after. Block-level group offloading and model offload keep the merged /
      fused path (merged weights are rebuilt after each onload, which gives new tensors; "scratch"
      keeps its copies on the onload device, so "inplace" or "off" save device memory); sequential
      and leaf-level offloading fall back as above. With ``weights="inplace"`` the originals are
      written back before the pipeline's or denoiser's ``enable_model_cpu_offload``,
      ``enable_sequential_cpu_offload``, ``enable_group_offload`` or ``enable_layerwise_casting``
      copies the weights (``accelerate.cpu_offload`` called directly gets them at the first fallback;
      call ``apply_group_offloading`` directly only before ``accelerate_fusion`` or its first image).
    - hotswap: ``pipe.load_lora_weights(file, adapter_name=<subject or style>, hotswap=True)`` on the
      pipeline re-prepares the method, the packed factors and the merged weights.
    - ``fuse_lora()``: unfuse before ``accelerate_fusion`` (it raises otherwise); after it, PEFT's
      merged sum runs (warned).
    """
    if not isinstance(subject, str) or not isinstance(style, str):
        raise TypeError("accelerate_fusion: subject and style must be adapter names (str)")
    from ..kernels._common import BACKENDS
    from .merged import WEIGHT_MODES

    if backend not in BACKENDS:  # now, not inside the first pipe() call
        raise ValueError(f"accelerate_fusion: backend must be one of {BACKENDS}, got {backend!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"accelerate_fusion: weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if coverage not in COVERAGES:
        raise ValueError(f"accelerate_fusion: coverage must be one of {COVERAGES}, got {coverage!r}")
    denoisers = _find_denoisers(pipe)
    remove_fusion(pipe)  # replace a previous installation
    loaded: list[str] = []
    for _, d in denoisers:
        for name in (getattr(d, "peft_config", None) or {}):
            if name not in loaded:
                loaded.append(name)
    if len(loaded) < 2:
        raise ValueError(
            f"accelerate_fusion needs two LoRA adapters loaded in the denoiser, found {len(loaded)}: {loaded}; "
            "load them with pipe.load_lora_weights(..., adapter_name=...)"
        )
    for role, name in (("subject", subject), ("style", style)):
        if name not in loaded:
            raise ValueError(f"accelerate_fusion: {role} adapter {name!r} is not loaded; loaded adapters: {loaded}")
    if subject == style:
        raise ValueError(f"accelerate_fusion: subject and style must be two different adapters, got {subject!r} twice")
    denoisers = [(c, d) for c, d in denoisers if subject in (getattr(d, "peft_config", None) or {})
                 or style in (getattr(d, "peft_config", None) or {})]
    from .lora_files import warn_alpha_mismatches

    warn_alpha_mismatches(pipe, [subject, style])  # kohya per-layer alphas PEFT did not apply: say so
    if isinstance(method, str):
        from ..fusion import get_method

        fusion_method = get_method(method, **method_options)
    else:
        from ..fusion.base import FusionMethod

        if not isinstance(method, FusionMethod):
            raise TypeError(f"accelerate_fusion: method must be a name or a FusionMethod, got {type(method).__name__}")
        if method_options:
            raise TypeError(f"accelerate_fusion: options {sorted(method_options)} given with a FusionMethod instance")
        fusion_method = method
    scheduler = None if isinstance(pipe, nn.Module) else getattr(pipe, "scheduler", None)
    div = (float(timestep_divisor) if timestep_divisor is not None
           else _timestep_divisor(_unwrap(denoisers[0][1]), scheduler))
    if not (div > 0 and math.isfinite(div)):
        raise ValueError(f"accelerate_fusion: timestep_divisor must be a positive number, got {timestep_divisor}")
    handle = FusionHandle(pipe, denoisers, fusion_method, subject, style, backend, log_gates, scheduler, div, weights)
    handle._divisor_fixed = timestep_divisor is not None
    handle.coverage = coverage
    if progress is None:
        progress = not (getattr(pipe, "_progress_bar_config", None) or {}).get("disable", False)
    handle.progress = bool(progress)
    try:
        handle._install()
        handle._watch_offload(pipe)
        if not isinstance(pipe, nn.Module):
            handle._weight_text_encoders(pipe)
            if hasattr(type(pipe), "load_lora_weights"):
                handle._watch_reloads(pipe)
        info = handle.summary()
        left = [f"{n} ({why}: {what})" for key, what in (("method_gates", "the method's rule"), ("peft_sum", "PEFT's sum"),
                                                          ("no_lora", "no LoRA")) for why, n in info[key].items()]
        _log.info("accelerate_fusion %s: %d layers on the %s path%s%s; left on PEFT: %s", info["method"], info["layers"],
                  info["path"], f" (weights={info['weights']})" if info["weights"] else "",
                  f", {info['cast_layers']} of them cast per call (layerwise casting)" if info["cast_layers"] else "",
                  ", ".join(left) or "none")
        if guidance is not None:
            from ..guidance.hook import enable_guidance

            handle.guidance = enable_guidance(pipe, guidance)
    except BaseException:
        handle.remove()
        raise
    return handle


def remove_fusion(pipe: Any) -> bool:
    """Remove what :func:`accelerate_fusion` installed on ``pipe`` (True if something was removed)."""
    try:
        denoisers = _find_denoisers(pipe) if not isinstance(pipe, nn.Module) else [("", pipe)]
    except ValueError:
        return False
    removed = False
    for _, d in denoisers:
        h = d.__dict__.get(_HANDLE_ATTR)
        if h is not None:
            h.remove()
            removed = True
    return removed
