"""The per-layer runtime shared by every integration: one :class:`FusionEngine` per installation.

An installation is a :class:`~lorafuse.fusion.base.FusionMethod` prepared for L patched linear
layers (W: N x K, bias b, two LoRAs each). The engine holds, besides the method,

- L :class:`LayerSlot` records (what the engine knows of a layer: its index, name, path and the
  state its last passed check left: merged or fused, the packed factors);
- the merged weights (:class:`~lorafuse.engine.merged.MergedWeights`) of methods whose gates are
  fixed within a denoiser call, ``W_eff = W + g_c s_c B_c A_c + g_s s_s B_s A_s``, and their flips;
- the gate log (:class:`~lorafuse.engine.gate_log.GateLog`);
- the sampling runs (:class:`~lorafuse.engine.run.RunTable`: one per concurrent request) and the
  current one (step, tau, recorder);
- a re-entrant lock: an integration holds it for a whole denoiser call (:meth:`FusionEngine.enter`
  / :meth:`FusionEngine.leave`), so that the method's step state, the merged-weight flips and the
  layer calls of one denoiser call are never interleaved with another request's.

Per denoiser call, :meth:`FusionEngine.begin_call`: the call's run made current (the method's
per-run state follows it), ``method.begin_step(Progress(tau, step, ...))``, then every merged weight
is made current (the flipped layers rebuilt, the pending ones built: a ``torch.compile`` graph reads
W_eff as an input and cannot build it), then the call's recorder. :meth:`FusionEngine.end_call` logs
the layer calls a compiled graph ran (they cannot record themselves).
Per layer call, :meth:`FusionEngine.call` (after the integration's own checks passed and
:meth:`FusionEngine.prepare_layer` put the layer on a path)::

    merged:  y = F.linear(x, W_eff, b)                           (one op: the bare layer's cost)
    fused:   y = method.layer_forward(l, x, W, b, packed)        (x (..., K) -> y (..., N))

and the recorder notes layer l. What a call does when it cannot take either path (PEFT's state,
offloading, autograd) is the integration's business: its fallbacks.

The integrations subclass :class:`LayerSlot` (a plain ``nn.Linear`` in :mod:`.module`, a PEFT
``lora.Linear`` in :mod:`lorafuse.integrations`). No diffusers, no PEFT here.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..fusion.base import FusionMethod, LayerLoRAs, Progress
from ..kernels import PackedLoRA
from ..kernels._common import BACKENDS
from .gate_log import GateLog, check_log_options, describe_keep
from .merged import WEIGHT_MODES, MergedWeights
from .run import RunTable, SamplingRun

__all__ = ["FusionEngine", "LayerSlot", "check_engine_options"]


def check_engine_options(what: str, weights: str, backend: str) -> None:
    """ValueError naming ``what`` (the caller) for an unknown ``weights`` mode or kernel ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"{what}: weights must be one of {WEIGHT_MODES}, got {weights!r}")


class LayerSlot:
    """One patched layer as the engine sees it. An integration subclasses it and implements
    :meth:`merge_inputs`, :meth:`pack` and :meth:`base_weight` from its own layer type.

    Attributes: ``index`` (the method's layer index), ``component`` and ``path`` (names for the gate
    log, whose entries say ``kind`` "linear" for these layers), ``fp`` (the integration's fingerprint
    of the state its last full check passed in; None: check the next call), ``merged`` (True: the
    layer runs on its merged weight), ``packed`` (the fused path's
    :class:`~lorafuse.kernels.PackedLoRA` for the input dtype of that check)."""

    __slots__ = ("index", "component", "path", "fp", "merged", "packed", "dst", "ran")
    kind = "linear"

    def __init__(self, index: int, component: str, path: str):
        self.index = index
        self.component = component
        self.path = path
        self.fp = None
        self.merged = False
        self.packed = None
        self.dst = None  # the layer's merged weight W_eff while it is current (what a compiled graph reads)
        self.ran = False  # set by a compiled graph that ran the layer (the gate log records it afterwards)

    def merge_inputs(self) -> tuple[torch.Tensor, list, Any]:
        """``(W, [(A_c, B_c, s_c), (A_s, B_s, s_s)], key)`` as they are now; equal keys mean equal
        factors and scalings (the merged weight built from them is still current)."""
        raise NotImplementedError

    def pack(self, x: torch.Tensor) -> PackedLoRA:
        """The layer's two LoRAs packed for ``x``'s dtype and device (cached by the integration)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor | None:
        """The weight tensor the layer's forward reads (where "inplace" writes W_eff)."""
        raise NotImplementedError

    def original_weight(self) -> torch.Tensor | None:
        """Where "inplace" writes the original back on removal (default: :meth:`base_weight`)."""
        return self.base_weight()

    def ready(self) -> bool:
        """Whether the layer can take the merged path now, as far as the host knows without an input
        (the engine merges the ready layers at the start of a denoiser call, before a compiled graph
        reads them); the integration's full check of each call still decides."""
        return True

    def merged_into(self, dst: torch.Tensor | None) -> None:
        """The engine (re)built the layer's W_eff in ``dst`` from its live state, or (None) dropped it.
        An integration may note what ``dst`` was built with (a compiled graph compares it by value)."""
        self.dst = dst


class FusionEngine:
    """The runtime of one installation (see the module docstring).

    Args:
        method: the :class:`FusionMethod` (prepared by :meth:`prepare`).
        layers: the :class:`LayerSlot` list, in method layer-index order (may be filled after
            construction, before :meth:`prepare`).
        weights: "scratch", "inplace" or "off": where merged weights live (see
            :mod:`lorafuse.engine.merged`); "off" and dynamic methods run the fused path.
        backend: kernel backend ("auto", "torch", "triton").
        log_gates: what :attr:`log` keeps of the layer calls' decisions: True (the last sampling
            run), "all", an int N (the last N denoiser calls) or False (nothing); see
            :func:`~lorafuse.engine.gate_log.check_log_options`.
        gate_log_sink: a callable taking a list of gate-log entries, or a file path (JSON lines
            appended), that gets every record when its denoiser call ends (also with
            ``log_gates=False``).
        log_layers: the layers the log names (default ``layers``; an integration appends layers
            the method does not decide for, see :meth:`record_decision`).
    """

    def __init__(self, method: FusionMethod, layers: list[LayerSlot], *, weights: str = "scratch",
                 backend: str = "auto", log_gates: bool | str | int = True, gate_log_sink=None,
                 log_layers: list | None = None):
        self.method = method
        self.layers = layers
        self.weights = weights
        self.backend = backend
        keep, sink = check_log_options("FusionEngine", log_gates, gate_log_sink)
        self.log_gates = keep is not None or sink is not None  # records are made
        self.log = GateLog(method, layers if log_layers is None else log_layers, keep, sink)
        self.merged: MergedWeights | None = None
        self.host_gates = False  # merged path whose gates the host knows per layer call (official tau)
        self.rows: list = []  # host_gates: each layer's (row, host key) of the current denoiser call
        self.pending: set[int] = set()  # layers merged at the next begin_call (once ready)
        self.traced = False  # a compiled graph ran layers in the current denoiser call (see end_call)
        self.run: SamplingRun | None = None  # the current run: the lock holder's
        self.runs = RunTable()
        self.lock = threading.RLock()
        self.calls = 0  # denoiser calls counted since installation (the gate log's "call")
        self.started = False  # a counted denoiser call began (a bool: compiled graphs guard on it)
        self.fallbacks: dict[str, int] = {}  # reason -> layer calls that left the merged / fused path

    # ---------------- installation ----------------
    def prepare(self, loras: Sequence[LayerLoRAs], device: torch.device | None) -> None:
        """Give the method every layer's two LoRAs as they are now and set up the merged weights
        (again after a hotswap: the previous merged weights are released first; the method's
        per-run state of every kept run is dropped, as the method's own is)."""
        for rec in self.layers:
            rec.fp, rec.packed = None, None
        self.method.prepare(loras, device)
        self.runs.drop_states()
        self.release()
        if (self.weights != "off" and not self.method.dynamic
                and type(self.method).layer_gates is not FusionMethod.layer_gates):
            self.merged = MergedWeights(len(self.layers), self.weights, self.backend)
            self.host_gates = self.method.step_decisions() is None  # official tau: per-call host gates
            self.pending = set(range(len(self.layers)))

    @property
    def path(self) -> str:
        """The layers' path: "merged" (one F.linear on W_eff per call) or "fused" (the fused kernel)."""
        return "merged" if self.merged is not None else "fused"

    def release(self, weights: Sequence[torch.Tensor | None] | None = None) -> None:
        """Drop the merged weights; "inplace" first writes every original back, into ``weights[l]``
        (default: each layer's :meth:`LayerSlot.base_weight`). The fused path takes over."""
        if self.merged is None:
            return
        if weights is None:
            weights = [rec.base_weight() for rec in self.layers]
        self.merged.release(list(weights))
        self.merged = None
        self.pending.clear()
        self.rows = []
        for rec in self.layers:
            rec.fp = None
            rec.merged_into(None)

    # ---------------- per sampling run / denoiser call ----------------
    def enter(self) -> bool:
        """Take the installation's lock for one denoiser call (re-entrant; :meth:`leave` gives it back).
        Returns True when another thread held it: a concurrent denoiser call made this one wait."""
        if self.lock.acquire(blocking=False):
            return False
        self.lock.acquire()
        return True

    def leave(self) -> None:
        """Give back the lock :meth:`enter` took."""
        self.lock.release()

    def start_run(self, marker: Any = None) -> SamplingRun:
        """A new sampling run under ``marker`` (kept in :attr:`runs`), made current: the method's
        per-run state starts afresh, the run counts from step 0; the gate log (keeping the last run)
        drops the previous run's records."""
        if self.log_gates:
            self.log.new_run()
        run = SamplingRun(marker)
        self.runs.add(run)
        self._make_current(run)
        return run

    def _make_current(self, run: SamplingRun) -> None:
        """``run`` becomes the current run: the previous one keeps the method's per-run state
        (``method.run_state()``), ``run``'s own comes back (None: a new run's)."""
        current = self.run
        if run is current:
            return
        if current is not None:
            current.state = self.method.run_state()
        self.method.set_run_state(run.state)
        run.state = None
        self.run = run

    def begin_call(self, tau, *, run: SamplingRun | None = None, step: int | None = None, num_steps: int | None = None,
                   timestep=None, t0=None, count: bool = True) -> SamplingRun:
        """Start a denoiser call of ``run`` (default: the current run) at progress ``tau`` (``step``:
        the call's index in the run, default the run's count). The run becomes current, the method
        updates its gates (``begin_step``), the merged weights of the layers whose gates flipped are
        rebuilt, and the call gets a recorder. ``count=False``: only set the gates (no recorder, the
        run and :attr:`calls` do not advance). ``timestep`` goes to the method, ``t0`` (the first
        sample's value) to the gate log. Concurrent callers hold :attr:`lock` across the call."""
        if run is None:
            run = self.run if self.run is not None else self.start_run()
        self._make_current(run)
        step = run.step if step is None else int(step)
        self.method.begin_step(Progress(tau=tau, step=step, num_steps=num_steps, timestep=timestep))
        if self.merged is not None:
            self._sync_merged()
        if not count:
            return run
        run.tau, run.timestep, run.num_steps = tau, t0, num_steps
        run.record = self.log.begin_call(self.calls, t0, tau) if self.log_gates else None
        run.step = step + 1
        self.calls += 1
        self.started = True
        return run

    def _sync_merged(self) -> None:
        """At the start of a denoiser call, after ``begin_step``: every merged weight is current for this
        call before any layer (eager or a compiled graph) reads it. The layers whose gates flipped are
        rebuilt (device-side gates: :meth:`MergedWeights.step`; host-side, official tau: each layer's
        row of this call, in layer order, as the layer calls would ask for it), then the pending layers
        (new, handed back, changed since the last run) that are :meth:`LayerSlot.ready` are built."""
        merged = self.merged
        if not self.host_gates:
            merged.step(self.method.step_decisions().gates)
        else:
            rows = []
            for rec in self.layers:
                row, key = self.method.layer_gates(rec.index)
                if key is None:  # neither step_decisions() nor host keys: merging cannot follow the gates
                    self.release()
                    return
                rows.append((row, key))
                if rec.dst is not None and key != merged.layers[rec.index].gate_key:
                    self._merge(rec, rows[-1], rebuild=True)
            self.rows = rows
        if self.pending:
            for i in sorted(self.pending):
                rec = self.layers[i]
                if rec.ready():
                    self._merge(rec)
            self.pending.clear()

    def _merge(self, rec: LayerSlot, row=None, rebuild: bool = False) -> None:
        """Build layer ``rec``'s W_eff from its live weight and factors with this call's gates (``row``:
        host-side ``(row, key)``), unless it is current (``rebuild``: its gates changed)."""
        merged = self.merged
        weight, loras, key = rec.merge_inputs()
        if not rebuild and merged.current(rec.index, weight, key):
            return
        if self.host_gates:  # this call's row (before any begin_call: the method's own, or its error)
            row, gate_key = row or (self.rows[rec.index] if self.rows else self.method.layer_gates(rec.index))
        else:
            row, gate_key = self.method.step_decisions().gates[rec.index], None
        rec.merged_into(merged.build(rec.index, weight, loras, key, row, gate_key))

    def end_call(self) -> None:
        """At the end of a denoiser call: the gate log records the layers a compiled graph ran (their
        calls could not record themselves), in layer order, with the decision the graph left on the
        layer's pack (:meth:`FusionMethod.decision_of`: dynamic methods) or the call's gates."""
        if not self.traced:
            return
        self.traced = False
        record = self.run.record if self.run is not None else None
        for rec in self.layers:
            if not rec.ran:
                continue
            rec.ran = False
            if record is None:
                continue
            d = self.method.decision_of(rec.packed) if rec.packed is not None else None
            if d is None:
                record(rec.index)
            else:
                self.log.record_given(rec.index, d)

    # ---------------- per layer call ----------------
    def prepare_layer(self, rec: LayerSlot, x: torch.Tensor) -> None:
        """After the integration's full check passed: put layer ``rec`` on the merged path (its weight
        built now unless it is current) or pack its LoRAs for the fused path at ``x``'s dtype."""
        if self.merged is None:
            rec.merged = False
            rec.packed = rec.pack(x)
            return
        rec.merged = True
        self._merge(rec)

    def call(self, rec: LayerSlot, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One layer call on the path :meth:`prepare_layer` chose; ``weight`` and ``bias`` are the
        layer's live parameters (the fused path reads ``weight``; the merged path reads W_eff)."""
        index = rec.index
        if rec.merged:
            y = F.linear(x, rec.dst, bias)
        else:
            y = self.method.layer_forward(index, x, weight, bias, rec.packed, backend=self.backend)
        record = self.run.record
        if record is not None:
            record(index)
        return y

    def record(self, index: int) -> None:
        """Note layer ``index``'s decision of this call in the gate log (an integration's fallback
        that applied the method's gates itself)."""
        record = self.run.record if self.run is not None else None
        if record is not None:
            record(index)

    def record_decision(self, index: int, gates: torch.Tensor, stats: dict | None = None) -> None:
        """Note the ``gates`` a logged layer the method does not decide for (log index ``index``,
        past the method's layers) applied in this call; ``gates`` is not written afterwards."""
        if self.run is not None and self.run.record is not None:
            self.log.record(index, gates, stats)

    def close(self) -> None:
        """The installation is removed: the gate log converted (no device tensor kept, the sink
        gets the rest)."""
        self.log.close()

    def layer_gates(self, index: int):
        """``(row, key)`` of layer ``index`` in this call, as :meth:`FusionMethod.layer_gates` (for an
        integration's fallback that applies the method's gates itself): with host-side gates on the
        merged path, the row :meth:`begin_call` asked the method for (not asked again)."""
        if self.merged is not None and self.host_gates and self.rows:
            return self.rows[index]
        return self.method.layer_gates(index)

    def hand_back(self, rec: LayerSlot, weight: torch.Tensor | None = None) -> None:
        """Before other code reads the layer's weight (the integration's fallback, a merge into it):
        "inplace" writes the original back into ``weight`` (default: :meth:`LayerSlot.original_weight`);
        the layer's next call checks and merges again."""
        rec.fp = None
        if self.merged is not None and self.merged.mode == "inplace":
            self.merged.restore(rec.index, rec.original_weight() if weight is None else weight)
            rec.merged_into(None)
            self.pending.add(rec.index)  # merged again at the next denoiser call once ready

    def recheck(self, rec: LayerSlot) -> None:
        """Layer ``rec``'s state changed (its factors, say): its next call checks it again and its merged
        weight is made current at the next :meth:`begin_call` (before a compiled graph reads it)."""
        rec.fp = None
        if self.merged is not None:
            self.pending.add(rec.index)

    def count_fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    # ---------------- reading ----------------
    def summary(self) -> dict[str, Any]:
        """``method``, ``layers``, ``path`` ("merged" / "fused"), ``weights`` (the merged weights'
        mode, None on the fused path), ``fallback_calls`` (reason -> layer calls that left it) and
        ``gate_log`` (``keeps``: what the log keeps, in words; ``calls``: denoiser calls held now;
        ``sink``: where records stream to, or None)."""
        log = self.log
        return {
            "method": getattr(self.method, "name", type(self.method).__name__),
            "layers": len(self.layers),
            "path": self.path,
            "weights": self.weights if self.merged is not None else None,
            "fallback_calls": dict(self.fallbacks),
            "gate_log": {"keeps": describe_keep(log.keep), "calls": log.held_calls(),
                         "sink": repr(log.sink) if log.sink is not None else None},
        }
