"""The gate log of an installation (a diffusers pipeline or plain modules): the decisions of the
patched layer calls (and of the layers an integration drives by the method's rule outside them,
:meth:`GateLog.record`), recorded on the device without host syncs and converted to Python only when
read (or, with a sink, when a denoiser call ends).

What it keeps (``log_gates``, :func:`check_log_options`): the last sampling run (default: a new run
drops the previous run's records, so a service's memory stays flat), everything (``"all"``), the last
N denoiser calls (an int) or nothing (``False``). A sink (``gate_log_sink``: a callable taking a list
of entries, or a path that gets one JSON line per entry appended) receives every record once, when
its denoiser call ends (at the next denoiser call or run, a read, :meth:`GateLog.close`), whatever
the log keeps.

Methods that decide once per denoiser call (:meth:`FusionMethod.step_decisions`: K-LoRA, EST, merge)
are logged from one snapshot per call (fields not written since the last snapshot are shared, not
copied) and the list of layers that called; the rows are gathered when the log is read. The others
(KL, official tau) are logged from one cloned :class:`~lorafuse.fusion.base.Decision` per layer call,
stacked into one tensor per field at the next denoiser call (bounded memory, one host copy per field
when read).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import torch

from ..fusion.base import Decision


LOG_KEEPS = ("run", "all")  # log_gates= besides True / False and an int N


class JsonLinesSink:
    """A gate-log sink that appends each entry to ``path`` as one JSON line (the file is opened per
    denoiser call, so it can be read or rotated while the pipeline runs)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)

    def __call__(self, entries: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in entries)

    def __repr__(self) -> str:
        return f"JsonLinesSink({self.path!r})"


def check_log_options(what: str, log_gates, sink) -> tuple[str | int | None, Callable[[list[dict]], None] | None]:
    """``(keep, sink)`` from ``log_gates`` (True: "run", the last sampling run; "all"; an int N >= 1:
    the last N denoiser calls; False: nothing) and ``sink`` (None, a callable taking a list of
    entries, or a str / PathLike: JSON lines appended); ValueError / TypeError naming ``what``."""
    if log_gates is True or log_gates is False:
        keep = "run" if log_gates else None
    elif isinstance(log_gates, str):
        if log_gates not in LOG_KEEPS:
            raise ValueError(f"{what}: log_gates must be True, False, one of {LOG_KEEPS} or a number of denoiser "
                             f"calls >= 1, got {log_gates!r}")
        keep = log_gates
    elif isinstance(log_gates, int):
        if log_gates < 1:
            raise ValueError(f"{what}: log_gates as a number of denoiser calls must be >= 1, got {log_gates}")
        keep = int(log_gates)
    else:
        raise TypeError(f"{what}: log_gates must be a bool, one of {LOG_KEEPS} or an int, "
                        f"got {type(log_gates).__name__}")
    if sink is None or callable(sink):
        return keep, sink
    if isinstance(sink, (str, os.PathLike)):
        return keep, JsonLinesSink(sink)
    raise TypeError(f"{what}: gate_log_sink must be a callable taking a list of entries or a file path, got "
                    f"{type(sink).__name__}")


def describe_keep(keep) -> str:
    """What a ``keep`` of :func:`check_log_options` means, in words (for ``summary()``)."""
    if keep is None:
        return "nothing"
    return {"run": "the last sampling run", "all": "everything"}.get(keep, f"the last {keep} denoiser calls")


class GateLog:
    """Records of ``method``'s decisions for the logged ``layers`` (objects with ``path`` and
    ``component``; the list may be filled after construction). :meth:`entries` gives one dict per
    (layer, layer call inside a denoiser call). ``keep`` and ``sink`` as :func:`check_log_options`
    returns them (see the module docstring)."""

    def __init__(self, method, layers: list, keep: str | int | None = "run", sink=None):
        self.method = method
        self.layers = layers
        self.keep = keep
        self.sink = sink
        self._call_info: dict[int, tuple[Any, Any]] = {}  # call -> (timestep (0-d), tau), of the calls held
        self._call = None  # the open denoiser call
        self._raw_log: list[tuple] = []  # (layer, call, gates, stats, tau) of the current call, device tensors
        # methods that decide once per step (StaticSelectMethod, ConstantGates): the current call's
        # (call, snapshot of every layer's Decision, [layers recorded]); None for the other methods
        self._step: tuple[int, Any, list[int]] | None = None
        self._clones: dict[str, tuple] = {}  # field -> (source, its memory_key, copy): unchanged, not copied again
        self._batches: list[tuple] = []  # finished calls: _raw_log stacked per field, or _step tuples
        self._log: list[dict] = []

    def begin_call(self, call: int, timestep, tau):
        """A new denoiser call: stack the previous call's records, remember this one's timestep and
        return its recorder, ``add(layer_index)``. For a per-step method (its decisions are fixed
        once :meth:`~lorafuse.fusion.base.FusionMethod.begin_step` ran) the call's snapshot is taken
        now and ``add`` is the bound ``append`` of the call's index list: the cheapest thing a layer
        call can do. Otherwise ``add`` keeps each layer call's own Decision (:meth:`_record_raw`).
        The previous call's records go to the sink; with ``keep`` N, calls before the last N go."""
        self._end_call()
        if isinstance(self.keep, int):
            self._drop_before(call - self.keep + 1)
        self._call = call
        self._call_info[call] = (timestep, tau)
        d = self.method.step_decisions()
        if d is None:
            self._step = None
            return functools.partial(self._record_raw, call)
        self._step = (call, self._snapshot(d), [])
        return self._step[2].append

    def _record_raw(self, call: int, index: int) -> None:
        """Layer ``index`` made its decision for denoiser call ``call`` (a method without per-step
        decisions): keep its own Decision (device copies at most, no host sync)."""
        self._record_raw_decision(index, call, self.method.last_decision(index))

    def _record_raw_decision(self, index: int, call: int, d: Decision) -> None:
        d = _clone_decision(d)
        self._raw_log.append((index, call, d.gates, d.stats, d.tau))

    def record_given(self, index: int, d: Decision) -> None:
        """Layer ``index``'s Decision ``d`` in the open denoiser call, given instead of asked for (a
        compiled graph's call: :meth:`~lorafuse.fusion.base.FusionMethod.decision_of`)."""
        if self._call is not None:
            self._record_raw_decision(index, self._call, d)

    def record(self, index: int, gates, stats: dict | None = None) -> None:
        """Layer ``index`` (a logged layer the method does not decide for, e.g. a covered conv LoRA
        layer) applied ``gates`` ((2,) or per sample (G, 2), a tensor that is not written later) in
        the open denoiser call."""
        if self._call is not None:
            self._raw_log.append((index, self._call, gates, stats or {}, None))

    def new_run(self) -> None:
        """A new sampling run starts: the previous call's records go to the sink; ``keep="run"``
        drops the previous run's records."""
        self._end_call()
        self._call = None
        if self.keep == "run":
            self._drop_before(None)

    def entries(self) -> list[dict]:
        """The log as dicts (converted lazily; the same list grows with later calls of the calls
        kept). Records converted here also go to the sink."""
        if self._raw_log or (self._step is not None and self._step[2]) or self._batches:
            self._convert()
        return self._log

    def clear(self) -> None:
        """Drop every record (those not yet in the sink go there first); the open call keeps logging."""
        if self.sink is not None:
            self.entries()
        info = self._call_info.get(self._call)
        self._drop_before(None)
        self._clones.clear()
        if info is not None:
            self._call_info[self._call] = info

    def close(self) -> None:
        """The installation is removed: every record is converted (the sink gets the rest) and no
        device tensor is kept; :meth:`entries` still reads what ``keep`` held."""
        self.entries()
        self._call = None
        self._step = None
        self._clones.clear()
        self._call_info.clear()

    def held_calls(self) -> int:
        """The denoiser calls whose records the log holds (or will convert)."""
        return len(self._call_info) if self.keep is not None else 0

    def _end_call(self) -> None:
        """Close the open call; with a sink, its records are converted and sent now."""
        self._compact()
        if self.sink is not None and self._batches:
            self._convert()
        if self.keep is None:  # a sink only: nothing held
            self._batches.clear()
            self._log.clear()
            self._call_info.clear()

    def _convert(self) -> None:
        """Convert the held records to entries (:meth:`_flush`); the new entries go to the sink."""
        start = len(self._log)
        self._flush()
        self._to_sink(start)

    def _to_sink(self, start: int) -> None:
        if self.sink is not None and len(self._log) > start:
            self.sink(self._log[start:])
            if self.keep is None:
                self._log.clear()

    def _drop_before(self, call: int | None) -> None:
        """Drop the records of the denoiser calls before ``call`` (None: all, the open call's included)."""
        if call is None:
            self._batches.clear()
            self._log.clear()
            self._call_info.clear()
            self._raw_log.clear()
            if self._step is not None:
                self._step[2].clear()
            return
        self._batches = [b for b in self._batches if (b[0] if len(b) == 3 else b[1][0]) >= call]
        i = 0
        while i < len(self._log) and self._log[i]["call"] < call:
            i += 1
        del self._log[:i]
        for c in [c for c in self._call_info if c < call]:
            del self._call_info[c]

    def _snapshot(self, d):
        """A copy of a step's decisions that later steps cannot change. A field whose tensor was not
        written since the last snapshot (the same live memory, the same version counter: constant
        scores, gates that did not flip) shares the previous copy instead of being copied again."""
        return Decision(self._keep("gates", d.gates), self._keep("tau", d.tau),
                        {k: self._keep("stats." + k, v) for k, v in (d.stats or {}).items()})

    def _keep(self, field: str, v):
        if not isinstance(v, torch.Tensor):
            return v
        key = memory_key(v)
        old = self._clones.get(field)
        if old is not None and old[1] == key:  # old[0] keeps the source alive: its address is still its own
            return old[2]
        copy = v.detach().clone()
        self._clones[field] = (v, key, copy)
        return copy

    def _end_step(self) -> None:
        """The current per-step call's records so far become a batch, expanded only when the log is
        read (:meth:`_expand_step`): no device op per denoiser call. The call stays open: its index
        list is emptied in place, so its recorder (``begin_call``'s ``add``) keeps working."""
        step = self._step
        if step is not None and step[2]:
            self._batches.append((step[0], step[1], list(step[2])))
            step[2].clear()

    @staticmethod
    def _expand_step(step) -> tuple:
        """A per-step call's records as a batch like :meth:`_compact`'s: each field gathered from the
        call's snapshot."""
        call, d, idx = step
        n = len(idx)
        rows = torch.tensor(idx, device=d.gates.device)

        def per_layer(v):
            if not isinstance(v, torch.Tensor):
                return [v] * n
            return v.index_select(0, rows) if v.dim() == 1 else v.reshape(()).expand(n)

        return (idx, [call] * n, d.gates.index_select(0, rows).unsqueeze(1),
                {k: per_layer(v) for k, v in d.stats.items()}, per_layer(d.tau))

    def _compact(self) -> None:
        """Close the current call: per-step records become a lazy batch; per-layer records are stacked
        into one tensor per field (device ops only, no sync): bounded memory and one host copy per
        field when the log is read."""
        self._end_step()
        pend = self._raw_log
        if not pend:
            return
        self._raw_log = []

        def stack(values):  # one tensor when they stack (torch checks shapes and devices), else a list
            if values and isinstance(values[0], torch.Tensor):
                try:
                    return torch.stack(values)
                except (TypeError, RuntimeError):
                    pass
            return list(values)

        keys = list(dict.fromkeys(k for p in pend for k in p[3]))
        self._batches.append((
            [p[0] for p in pend], [p[1] for p in pend], stack([p[2] for p in pend]),
            {k: stack([p[3].get(k) for p in pend]) for k in keys}, stack([p[4] for p in pend]),
        ))

    def _flush(self) -> None:
        self._compact()
        per_sample = bool(getattr(self.method, "dynamic", False))

        def rows(v, n):
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
                return [r.item() if r.numel() == 1 else r.tolist() for r in v] if n else []
            return [_to_py(x) for x in v]

        for batch in self._batches:
            idx, calls, gates, stats, taus = batch if len(batch) == 5 else self._expand_step(batch)
            n = len(idx)
            g_rows = [torch.as_tensor(g).float().reshape(-1, 2) for g in
                      (gates.detach().cpu().unbind(0) if isinstance(gates, torch.Tensor) else gates)]
            stat_rows = {k: rows(v, n) for k, v in stats.items()}
            tau_rows = rows(taus, n)
            for j in range(n):
                index, call, g = idx[j], calls[j], g_rows[j]
                rec = self.layers[index]
                t0, tau = self._call_info.get(call, (None, None))
                if per_sample:
                    subj, sty = g[:, 0].tolist(), g[:, 1].tolist()
                else:
                    subj, sty = float(g[0, 0]), float(g[0, 1])
                entry = {
                    "layer": rec.path,
                    "component": rec.component,
                    "layer_index": index,
                    "call": call,
                    "timestep": _to_py(t0),
                    "tau": _to_py(tau),
                    "subject": subj,
                    "style": sty,
                    "kind": getattr(rec, "kind", "linear"),
                }
                coverage = getattr(rec, "coverage", None)
                if coverage is not None:
                    entry["coverage"] = coverage
                if tau_rows[j] is not None:
                    entry["method_tau"] = tau_rows[j]
                for k, v in stat_rows.items():
                    if v[j] is not None:
                        entry.setdefault(k, v[j])
                self._log.append(entry)
        self._batches.clear()


def _clone_decision(d):
    """A Decision whose tensors are detached copies (the method's may be views of live state), or
    the method's own when it says they are ``fresh`` (new per call, never updated)."""
    if getattr(d, "fresh", False) and isinstance(d.gates, torch.Tensor) and not d.gates.requires_grad:
        return d

    def copy(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    gates = copy(d.gates) if isinstance(d.gates, torch.Tensor) else torch.as_tensor(d.gates)
    return Decision(gates, copy(d.tau), {k: copy(v) for k, v in (d.stats or {}).items()})


def memory_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents while the tensor is alive: its memory, layout and
    version counter (bumped by every in-place write, views included)."""
    return t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device


def _to_py(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    return v
