"""The gate log of an installation: every decision of every patched layer call, recorded on the
device without host syncs and converted to Python only when read.

Methods that decide once per denoiser call (:meth:`FusionMethod.step_decisions`: K-LoRA, EST, merge)
are logged from one snapshot per call; the others (KL, official tau) from one cloned
:class:`~lorafuse.fusion.base.Decision` per layer call. At each new denoiser call the pending records
are stacked into one tensor per field (bounded memory, one host copy per field when read).
"""

from __future__ import annotations

from typing import Any

import torch


class GateLog:
    """Records of ``method``'s decisions for the patched ``layers`` (objects with ``path`` and
    ``component``; the list may be filled after construction). :meth:`entries` gives one dict per
    (layer, layer call inside a denoiser call)."""

    def __init__(self, method, layers: list):
        self.method = method
        self.layers = layers
        self._call_info: dict[int, tuple[Any, Any]] = {}  # call -> (timestep (0-d), tau)
        self._raw_log: list[tuple] = []  # (layer, call, gates, stats, tau) of the current call, device tensors
        # methods that decide once per step (StaticSelectMethod, ConstantGates): one snapshot per call
        self._snapshots: dict[int, Any] = {}  # call -> Decision of every layer (cloned), or None
        self._light_log: list[tuple[int, int]] = []  # (layer, call) whose decision is in _snapshots
        self._batches: list[tuple] = []  # _raw_log of finished calls, stacked per field
        self._log: list[dict] = []

    def begin_call(self, call: int, timestep, tau) -> None:
        """A new denoiser call: stack the previous call's records and remember this one's timestep."""
        self._compact()
        self._call_info[call] = (timestep, tau)

    def entries(self) -> list[dict]:
        """The log as dicts (converted lazily; the same list grows with later calls)."""
        if self._raw_log or self._light_log or self._batches:
            self._flush()
        return self._log

    def clear(self) -> None:
        self._raw_log.clear()
        self._light_log.clear()
        self._snapshots.clear()
        self._batches.clear()
        self._log.clear()
        self._call_info.clear()

    def record(self, index: int, call: int) -> None:
        """Layer ``index`` made its decision for denoiser call ``call``: keep it (device copies at
        most, no host sync)."""
        if call not in self._snapshots:  # first record of this call: can the whole step be copied at once?
            d = self.method.step_decisions()
            self._snapshots[call] = None if d is None else _clone_decision(d)
        if self._snapshots[call] is not None:
            self._light_log.append((index, call))
            return
        d = _clone_decision(self.method.last_decision(index))
        self._raw_log.append((index, call, d.gates, d.stats, d.tau))

    def _expand_light(self) -> list[tuple]:
        """The (layer, call) records of per-step methods as batches like :meth:`_compact`'s: each
        field gathered from the call's snapshot (a few device ops per call, none per layer)."""
        by_call: dict[int, list[int]] = {}
        for index, call in self._light_log:
            by_call.setdefault(call, []).append(index)
        self._light_log = []
        batches = []
        for call, idx in by_call.items():
            d = self._snapshots.pop(call)
            n = len(idx)
            rows = torch.tensor(idx, device=d.gates.device)

            def per_layer(v):
                if not isinstance(v, torch.Tensor):
                    return [v] * n
                return v.index_select(0, rows) if v.dim() == 1 else v.reshape(()).expand(n)

            batches.append((idx, [call] * n, d.gates.index_select(0, rows).unsqueeze(1),
                            {k: per_layer(v) for k, v in d.stats.items()}, per_layer(d.tau)))
        return batches

    def _compact(self) -> None:
        """Stack the pending per-layer records of one denoiser call into one tensor per field (device
        ops only, no sync): bounded memory and one host copy per field when the log is read."""
        if self._light_log:
            self._batches.extend(self._expand_light())
        self._snapshots.clear()  # a later record of the current call takes a new snapshot
        pend = self._raw_log
        if not pend:
            return
        self._raw_log = []

        def stack(values):
            if values and all(isinstance(v, torch.Tensor) for v in values) and len(
                    {(v.shape, v.dtype, v.device) for v in values}) == 1:
                return torch.stack(values)
            return list(values)

        keys: list[str] = []
        for p in pend:
            keys.extend(k for k in p[3] if k not in keys)
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

        for idx, calls, gates, stats, taus in self._batches:
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
                }
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
    from ..fusion.base import Decision

    if getattr(d, "fresh", False) and isinstance(d.gates, torch.Tensor) and not d.gates.requires_grad:
        return d

    def copy(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    gates = copy(d.gates) if isinstance(d.gates, torch.Tensor) else torch.as_tensor(d.gates)
    return Decision(gates, copy(d.tau), {k: copy(v) for k, v in (d.stats or {}).items()})


def _to_py(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    return v
