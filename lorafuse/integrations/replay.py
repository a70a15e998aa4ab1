"""Replay a fusion run's gate log through PEFT's own forward: the reference a fused run is checked
against (the demo's "max diff vs reference", and the integration tests).

``GateReplay(pipe, handle.gate_log, names=(subject, style))`` installs on a pipeline that has the
same two adapters loaded and *no* lorafuse installation: every LoRA layer's call ``(layer, call)``
runs PEFT's forward with the logged gates (a one-hot gate: only that adapter active; other gates:
each adapter's scaling times its gate; per-sample gates split the batch). ``remove()`` undoes it.
"""

from __future__ import annotations

import torch

from .tiny import denoiser, peft_layers


def peft_forward_with_gates(m, x, gates, names, *args, **kwargs):
    """PEFT's own forward of layer ``m`` with adapter ``names[i]``'s scaling multiplied by
    ``gates[i]`` (floats); a one-hot gate runs PEFT with only the selected adapter active (no scaling
    change at all: exact for DoRA too). The layer's active adapters and scalings are restored."""
    cls_forward = type(m).forward
    saved_active = m.__dict__.get("_active_adapter", _MISSING)
    g = [float(v) for v in gates]
    try:
        if sorted(g) == [0.0, 1.0]:
            m._active_adapter = [names[g.index(1.0)]]
            return cls_forward(m, x, *args, **kwargs)
        m._active_adapter = list(names)
        saved = dict(m.scaling)
        try:
            for a, gi in zip(names, g):
                m.scaling[a] = saved[a] * gi
            return cls_forward(m, x, *args, **kwargs)
        finally:
            m.scaling.clear()
            m.scaling.update(saved)
    finally:
        if saved_active is _MISSING:
            m.__dict__.pop("_active_adapter", None)
        else:
            m._active_adapter = saved_active


_MISSING = object()


class GateReplay:
    """Install on a pipeline *without* lorafuse: every LoRA layer runs PEFT with the gates that a
    lorafuse run logged for (layer, call) (per-sample gates split the batch)."""

    def __init__(self, pipe, gate_log, names=("sbj", "sty")):
        if not gate_log:
            raise ValueError("GateReplay: the gate log is empty (run the fused pipeline with log_gates=True first)")
        self.model = denoiser(pipe)
        self.names = list(names)
        first = min(e["call"] for e in gate_log)
        self.table = {(e["layer"], e["call"] - first): (e["subject"], e["style"]) for e in gate_log}
        self.call = -1
        self.misses = 0
        self.layers = peft_layers(self.model, names)
        self._hook = self.model.register_forward_pre_hook(self._pre)
        self._saved = [(m, m.__dict__.get("_active_adapter")) for _, m in self.layers]
        for path, m in self.layers:
            m._active_adapter = list(names)
            m.forward = self._make(path, m)

    def _pre(self, module, args):
        self.call += 1

    def _make(self, path, m):
        def forward(x, *args, **kwargs):
            key = (path, self.call)
            if key not in self.table:
                self.misses += 1
                return type(m).forward(m, x, *args, **kwargs)
            gs, gt = self.table[key]
            if isinstance(gs, list):
                outs = [peft_forward_with_gates(m, x[i: i + 1], (gs[i], gt[i]), self.names) for i in range(x.shape[0])]
                return torch.cat(outs, 0)
            return peft_forward_with_gates(m, x, (gs, gt), self.names)

        return forward

    def remove(self):
        self._hook.remove()
        for _, m in self.layers:
            m.__dict__.pop("forward", None)
        for m, a in self._saved:
            m._active_adapter = a
