"""The ``coverage`` policy: what the two adapters' LoRA layers that the kernels do not patch compute
(conv LoRAs: SD1.5's 1x1 ``proj_in``/``proj_out``, kohya LoCon; layers only one adapter targets).

``coverage="peft"``: left as they are, PEFT's sum of the active adapters (what plain loading gives).
``coverage="none"``: neither adapter acts there, PEFT's forward with no adapter active (the base
layer), as in the official K-LoRA code, which applies no LoRA outside the attention linears it
patches. ``coverage="method"`` (default): the method's rule, through PEFT's own forward of the layer
(exact for DoRA):

- constant gates (merge, subject, style): PEFT with each adapter's scaling times its weight, as
  ``set_adapters([subject, style], [w_c, w_s])`` does on every layer;
- klora / est (static selection), conv layers with both adapters: the layer's own scores from its
  flattened deltas (A (r, C_in kh kw), B (C_out, r) when B is 1x1), the installed gamma and this
  step's S(tau): one adapter per step, as on the patched layers;
- kl, conv layers with both adapters: the per-sample KL rule on the layer's PEFT outputs, output
  channels as the softmax axis and every pixel a token;
- a layer only one adapter targets, under a selecting method (klora, est, kl): the rule with the
  absent adapter's delta 0 selects the present one (kl: unless its KL is exactly 0, a delta that
  shifts every channel equally), i.e. PEFT's forward as it is;
- anything else (a method with no rule outside its prepared layers, a conv B that is not 1x1, a
  layer another hook already wraps): PEFT's sum, reported as such.

Every layer that follows a rule or runs with no adapter is in the gate log (:class:`LoggedLayer`,
indexed after the method's layers: ``kind`` "conv" or "single-adapter", ``coverage`` the policy):
the gates it applied per denoiser call ((2,), or per sample for kl), so that
:class:`~lorafuse.integrations.replay.GateReplay` reproduces the image. Their klora / est scores are
computed at install, and again after a hotswap (:meth:`Coverage.rescore`).
"""

from __future__ import annotations

import weakref

import torch

from ..fusion import ConstantGates, FusionMethod
from ..fusion._common import StaticSelectMethod
from .peft_state import _diffusers_slot, _flat_conv_lora
from .replay import _decide_and_select, peft_adapter_outputs, peft_forward_with_gates, select_per_sample

COVERAGES = ("method", "peft", "none")  # accelerate_fusion(coverage=...)


class LoggedLayer:
    """A covered layer as the gate log names it: ``component``, ``path`` (inside the denoiser),
    ``kind`` ("conv" or "single-adapter") and ``coverage`` (the policy that drives it)."""

    __slots__ = ("component", "path", "kind", "coverage")

    def __init__(self, name: str, kind: str, coverage: str):
        self.component, _, self.path = name.partition(".")
        self.kind = kind
        self.coverage = coverage


class Coverage:
    """The covered layers of one installation: ``covered`` (layer, the forward we set),
    ``rule_paths`` (layers that follow the method's rule), ``none_paths`` (layers run with no
    adapter), ``scores`` (path -> (conv layer, klora / est scores)) and ``logged`` (the
    :class:`LoggedLayer` of each layer with a forward of ours, in gate-log index order after the
    method's layers)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.covered: list = []
        self.rule_paths: set[str] = set()
        self.none_paths: set[str] = set()
        self.scores: dict = {}
        self.logged: list[LoggedLayer] = []

    def apply(self, h, uncovered, hook_slots: list) -> None:
        """Set the policy's forward on each ``(path, layer)`` of ``uncovered`` for installation ``h``;
        slots taken in diffusers' hook chains go to ``hook_slots`` (see the module docstring)."""
        s, t = h.subject, h.style
        method = h.method
        selecting = isinstance(method, StaticSelectMethod) or hasattr(method, "decide_from_outputs")
        for path, m in uncovered:
            if self.policy == "peft":
                continue
            both = s in m.lora_A and t in m.lora_A
            rule = None
            if self.policy == "none":
                rule = ("gates", (0.0, 0.0))
            elif isinstance(method, ConstantGates):
                rule = ("gates", tuple(method._weights))
            elif not both and selecting:  # the present adapter acts: PEFT's forward as it is
                rule = ("single", (1.0, 0.0) if s in m.lora_A else (0.0, 1.0))
            elif both and isinstance(method, StaticSelectMethod):
                scores = conv_scores(method, m, (s, t))
                if scores is not None:
                    self.scores[path] = (m, scores)
                    rule = ("static", path)
            elif both and hasattr(method, "decide_from_outputs"):
                rule = ("dynamic", None)
            if rule is None:
                continue
            index = len(h.engine.layers) + len(self.logged)
            fwd = self._make_forward(h, m, rule, index)
            if "forward" not in m.__dict__:
                m.forward = fwd
            else:
                slot = _diffusers_slot(m)
                if slot is None:  # another hook owns the layer's forward: PEFT's sum
                    if rule[0] == "single":
                        self.rule_paths.add(path)  # which is the rule there (not logged)
                    continue
                ref, attr = slot
                hook_slots.append((ref, attr, getattr(ref, attr), fwd))
                setattr(ref, attr, fwd)
            self.covered.append((m, fwd))
            self.logged.append(LoggedLayer(path, "single-adapter" if not both else "conv", self.policy))
            (self.none_paths if self.policy == "none" else self.rule_paths).add(path)

    def report(self, unpatched: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
        """Counts of the LoRA layers the kernels do not patch (``unpatched``: (path, reason) each):
        ``unpatched`` (reason -> layers), split by what computes them into ``method_gates`` (the
        method's rule), ``no_lora`` (neither adapter) and ``peft_sum`` (reason -> layers each), and
        ``covered_by`` ("conv" / "single-adapter" + "method's rule" / "no LoRA", or "PEFT's sum" ->
        layers); see ``FusionHandle.summary``."""
        counts: dict[str, dict[str, int]] = {"unpatched": {}, "method_gates": {}, "peft_sum": {}, "no_lora": {},
                                             "covered_by": {}}

        def add(part: str, key: str) -> None:
            counts[part][key] = counts[part].get(key, 0) + 1

        for path, why in unpatched:
            rule = "method's rule" if path in self.rule_paths else "no LoRA" if path in self.none_paths else None
            kind = ("conv" if why.startswith("not a linear") else "single-adapter" if why.startswith("only the")
                    else None)
            add("unpatched", why)
            add("method_gates" if rule == "method's rule" else "no_lora" if rule else "peft_sum", why)
            add("covered_by", f"{kind}, {rule}" if kind and rule else "PEFT's sum")
        return counts

    def rescore(self, method: FusionMethod, names: tuple[str, str]) -> None:
        """After a reload of an adapter (hotswap): the covered conv layers' scores from the new factors."""
        for path, (m, old) in list(self.scores.items()):
            scores = conv_scores(method, m, names)
            self.scores[path] = (m, old if scores is None else scores)

    def remove(self) -> None:
        for m, fwd in self.covered:
            if m.__dict__.get("forward") is fwd:
                del m.__dict__["forward"]
        self.covered.clear()

    def _make_forward(self, h, m, rule, index: int):
        """The forward of an unpatched LoRA layer under ``coverage="method"`` / ``"none"``, logged as
        gate-log layer ``index``. Outside a denoiser call, with extra forward arguments, or when the
        user's PEFT state decides (adapters disabled, merged, another set of adapters active): PEFT's
        forward as it is, not logged."""
        ref = weakref.ref(h)
        cls_forward = type(m).forward
        kind, data = rule
        scores = self.scores
        fixed = torch.tensor(data, dtype=torch.float32) if kind in ("gates", "single") else None
        per_sample = bool(getattr(h.method, "dynamic", False))  # the log's gates per sample, as kl's layers

        def forward(x, *args, **kwargs):
            h = ref()
            if (h is None or h._removed or h._suspended or not h.engine.started or args or kwargs
                    or m.disable_adapters or m.merged):
                return cls_forward(m, x, *args, **kwargs)
            names = (h.subject, h.style)
            held = [a for a in names if a in m.lora_A]
            if sorted(a for a in m.active_adapters if a in m.lora_A) != sorted(held):
                return cls_forward(m, x, *args, **kwargs)
            engine = h.engine
            if kind == "gates" or kind == "single":
                y = peft_forward_with_gates(m, x, data, names) if kind == "gates" else cls_forward(m, x)
                engine.record_decision(index, fixed.expand(x.shape[0], 2) if per_sample else fixed)
                return y
            if kind == "dynamic":
                y, gates, D = _decide_and_select(h.method, m, x, names, None, (), {})
                if gates is not None:
                    engine.record_decision(index, gates, {"kl": D})
                return y
            score_c, score_s = scores[data][1]
            gates = h.method.extra_gates(score_c, score_s)
            engine.record_decision(index, gates, {"subject_score": score_c, "style_score": score_s})
            _, ys, _ = peft_adapter_outputs(m, x, names)
            return select_per_sample(gates.reshape(1, 2).to(ys[0].device), ys)

        # inside a compiled graph the rule's host state (the call's scores, the log) would become
        # guards that change every denoiser call: such a layer runs eagerly (one graph break per call)
        eager = torch._dynamo.disable(forward)

        def covered_forward(x, *args, **kwargs):
            if torch.compiler.is_compiling():
                return eager(x, *args, **kwargs)
            return forward(x, *args, **kwargs)

        return covered_forward


def conv_scores(method, m, names: tuple[str, str]):
    """klora / est's (score_c, score_s) of conv LoRA layer ``m`` from its flattened deltas, as they
    are now; None when a B is not a 1x1 kernel."""
    pair = [_flat_conv_lora(m, a) for a in names]
    return None if None in pair else method.layer_scores(*pair)
