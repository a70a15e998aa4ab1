"""Replay a fusion run's gate log through PEFT's own forward: the reference a fused run is checked
against (the demo's "max diff vs reference", and the integration tests).

``GateReplay(pipe, handle.gate_log, names=(subject, style))`` installs on a pipeline that has the
same two adapters loaded and *no* lorafuse installation: every linear LoRA layer holding both
adapters, and every other LoRA layer the log names (conv and single-adapter layers under
``coverage="method"`` / ``"none"``), runs PEFT's forward with the gates logged for its call
``(layer, call)`` (a one-hot gate: only that adapter active; other gates: each adapter's scaling
times its gate; per-sample gates split the batch). LoRA layers the log does not name run PEFT's
forward as it is (``coverage="peft"``). ``remove()`` undoes it.
"""

from __future__ import annotations

import torch
from torch import nn

from .compat import lora_variants
from .tiny import denoiser, peft_layers


def peft_forward_with_gates(m, x, gates, names, *args, **kwargs):
    """PEFT's own forward of layer ``m`` with adapter ``names[i]``'s scaling multiplied by
    ``gates[i]`` (floats). Gates that are all 0 or 1 (one-hot, both, none) run PEFT with exactly the
    adapters whose gate is 1 active (no scaling change at all: exact for DoRA too). Adapters the
    layer does not hold are skipped (a layer only one of the two adapters targets). The layer's
    active adapters and scalings are restored."""
    cls_forward = type(m).forward
    saved_active = m.__dict__.get("_active_adapter", _MISSING)
    held = m.lora_A
    pairs = [(a, float(v)) for a, v in zip(names, gates) if a in held]
    try:
        if all(gi in (0.0, 1.0) for _, gi in pairs):
            m._active_adapter = [a for a, gi in pairs if gi == 1.0]
            return cls_forward(m, x, *args, **kwargs)
        m._active_adapter = [a for a, _ in pairs]
        saved = dict(m.scaling)
        try:
            for a, gi in pairs:
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


def peft_adapter_outputs(m, x, names, *args, **kwargs):
    """PEFT's forward of LoRA layer ``m`` (linear or conv) taken apart, for deciding between its
    adapters from their outputs: ``(f0, ys, ds)`` with

        f0    = the base layer's output (what PEFT computes with the adapters off)
        ys[i] = PEFT's output with only ``names[i]`` active: f0 + d_i as PEFT's plain Linear / Conv
                layers add it, else (an adapter variant such as DoRA, another layer class such as a
                quantized one) PEFT's own forward with only that adapter active (exact)
        ds[i] = ys[i] - f0: the adapter's perturbation, in fp32 (fp64 for fp64 outputs), computed
                from the adapter's own modules for a plain LoRA (no cancellation against f0)

    An adapter the layer does not hold gives ys[i] = f0, ds[i] = 0. Dropout runs as in PEFT (once
    per adapter). The layer's state is not changed."""
    f0 = m.base_layer(x, *args, **kwargs)
    dt = torch.float64 if f0.dtype == torch.float64 else torch.float32
    variants = lora_variants(m)
    plain = type(m).forward in _plain_forwards()  # other layer classes (bitsandbytes, ...): their own forward
    ys, ds = [], []
    for a in names:
        if a not in m.lora_A:
            ys.append(f0)
            ds.append(torch.zeros_like(f0, dtype=dt))
        elif a in variants or not plain:
            y = peft_forward_with_gates(m, x, [1.0], [a], *args, **kwargs)
            ys.append(y)
            ds.append(y.to(dt) - f0.to(dt))
        else:
            lora_A, lora_B = m.lora_A[a], m.lora_B[a]
            xa = m._cast_input_dtype(x, lora_A.weight.dtype) if hasattr(m, "_cast_input_dtype") else x
            d = lora_B(lora_A(m.lora_dropout[a](xa))) * m.scaling[a]
            ys.append((f0 + d).to(f0.dtype))
            ds.append(d.to(dt))
    return f0, ys, ds


def _plain_forwards():
    """The forwards of PEFT's plain LoRA layer classes, whose output with one adapter active is
    ``(base(x) + lora_B(lora_A(dropout(x))) * scaling).to(base dtype)``."""
    from peft.tuners.lora import layer

    return {layer.Linear.forward, layer._ConvNd.forward}


def select_per_sample(gates, ys):
    """Per sample g, ``ys[i][g]`` for the one adapter i with ``gates[g, i] = 1`` (gates (G, 2) one-hot,
    G = the outputs' leading dimension, or 1 for all); no host read."""
    y0, y1 = ys
    pick = gates[:, 0] > 0
    pick = pick.reshape(pick.shape[0], *([1] * (y0.dim() - 1))) if y0.dim() >= 2 else pick.reshape(-1)[:1]
    return torch.where(pick, y0, y1)


_MISSING = object()


class GateReplay:
    """Install on a pipeline *without* lorafuse: every LoRA layer the log names (and every linear one
    holding both adapters) runs PEFT with the gates that a lorafuse run logged for (layer, call)
    (per-sample gates split the batch); ``misses`` counts their calls the log has no gates for. A
    layer beyond the linear ones whose forward someone already set is left alone."""

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
        linear = {id(m) for _, m in self.layers}
        logged = {e["layer"] for e in gate_log}
        held = [(path, m) for path, m in self.model.named_modules()
                if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and any(a in m.lora_A for a in names)]
        self.layers += [(path, m) for path, m in held
                        if path in logged and id(m) not in linear and "forward" not in m.__dict__]
        self._hook = self.model.register_forward_pre_hook(self._pre)
        # both adapters active on every LoRA layer holding one, as accelerate_fusion activates them
        self._saved = [(m, m.__dict__.get("_active_adapter")) for _, m in held]
        for _, m in held:
            m._active_adapter = list(names)
        for path, m in self.layers:
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


def _decide_and_select(method, m, x, names, layer, args, kwargs):
    """A dynamic method's decision for one call of PEFT layer ``m`` (linear or conv) outside the
    fused kernel: PEFT's pieces (:func:`~lorafuse.integrations.replay.peft_adapter_outputs`) give the
    per-sample statistics (output channels as the softmax axis: the last axis of a linear's output,
    axis 1 of a conv's), ``method.decide_from_outputs`` decides with the method's own rule (kept as
    layer ``layer``'s decision unless None), and each sample gets its selected adapter's output.
    Returns ``(y, gates (G, 2), D (G, 2))``; gates and D are None for an empty input."""
    f0, ys, ds = peft_adapter_outputs(m, x, names, *args, **kwargs)
    G = f0.shape[0] if f0.dim() >= 2 else 1
    if G == 0 or f0.numel() == 0:
        return ys[0], None, None
    if isinstance(m.get_base_layer(), nn.modules.conv._ConvNd) and f0.dim() >= 3:
        f0c, dc, dsty = (t.movedim(1, -1) for t in (f0, *ds))
    else:
        f0c, dc, dsty = f0, ds[0], ds[1]
    gates, D = method.decide_from_outputs(f0c, dc, dsty, G, layer=layer)
    return select_per_sample(gates.to(f0.device), ys), gates, D
