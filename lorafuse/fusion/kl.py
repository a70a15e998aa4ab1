"""KL dynamic selection (Cao et al., arXiv 2602.15539, feature-level selection): per layer, per
forward and per sample, the LoRA that moves the output distribution more acts.

For a layer call with rows x_m (M = G samples x T tokens), f0 = x W^T + b and d_i = s_i (x A_i^T) B_i^T:

    p0 = softmax(f0_m), p_i = softmax(f0_m + d_i,m) over the N output channels, per token m
    "forward":  k_i,m = KL(p0 || p_i)        "reverse":  k_i,m = KL(p_i || p0)
    "sample":   D_i,g = mean of k_i,m over the T tokens of sample g      (one decision per sample)
    "batch":    D_i   = mean of k_i,m over all M rows                     (one decision for all)
    subject  iff  D_c > D_s, or D_c >= D_s with tie="subject" (the default: algorithms.md §3(b))

The statistics come from the fused kernel's epilogue (:func:`lorafuse.kernels.fused_lora_forward`).
Two execution modes give the same decisions:

    "speculative" (default): one :func:`lorafuse.kernels.kl_select` call. Triton path, 4 launches:
        y = fused(x; g_old) with statistics partials; g_new = kl_decide(partials) on the device
        (written in place into g_old, a preallocated (G, 2) tensor per layer, reallocated when G
        changes; :meth:`KLDynamic.reset` restores the initial gates); y += U (g_new - g_old) B^T
        (lora_fixup: a no-op on the device for unflipped samples). Torch path (CPU): a compact fp32
        sequence that decides first and needs no speculation; :meth:`KLDynamic.layer_forward` enters
        it straight through :func:`lorafuse.kernels.kl_decide.kl_select_plain` (host-cheap checks, no
        state kept) and leaves every other call to kl_select's full checks.
    "two_pass" (reference): stats = fused(x) statistics, decide, y = fused(x; g_new)

Inside a ``torch.compile`` graph (``compiled``, one switch): "plain" traces
:func:`lorafuse.kernels.kl_decide.kl_select_traced`, about fifteen plain ops that Inductor fuses
(three GEMMs, one fused softmax / expm1 / row-sum loop nest, the decision, a pointwise y); "kernels"
traces kl_select's registered Triton ops (``lorafuse::fused_lora_linear``, ``lorafuse::kl_decide``,
``lorafuse::lora_fixup``), speculating the tie rule's LoRA at every call (the graph keeps no per-layer
state: the decision never depends on the speculation, only the fix-up's work does). "auto" (default):
"kernels" when the call's backend resolves to Triton (CUDA), "plain" elsewhere (the CPU). Why kernels
on CUDA: 4 launches with the statistics in the GEMM's epilogue in x's dtype, against the plain path's
3 GEMMs in fp32 (x, W and the factors upcast each call: tensor cores idle) plus the fp32 (M, N) f0
and (2, M, N) d written and read back two or three times; the GPU check measures both. The graph
never reads the layer index (a Python int would become a guard: one recompile per layer when
diffusers' regional compilation reuses one block's graph for every block): the call's decision goes
to ``packed.notes`` (:class:`lorafuse.kernels.packing.CallNotes`), read by :meth:`KLDynamic.decision_of`.

Nothing reads a device value on the host. Zero LoRAs have k = 0 exactly (ties).
"""

from __future__ import annotations

import torch

from ..kernels import PackedLoRA, fused_lora_linear, kl_select
from ..kernels.kl_decide import kl_divergences, kl_select_plain, kl_select_traced
from ._common import check_choice, validate_layers
from .base import Decision, FusionMethod, Progress


class KLDynamic(FusionMethod):
    """Options: ``direction`` "forward" | "reverse", ``reduction`` "sample" | "batch", ``tie``
    "subject" | "style", ``mode`` "speculative" | "two_pass" (eager calls), ``compiled`` "auto" |
    "kernels" | "plain" (calls inside a ``torch.compile`` graph; module docstring)."""

    name = "kl"
    dynamic = True

    def __init__(self, *, direction: str = "forward", reduction: str = "sample", tie: str = "subject",
                 mode: str = "speculative", compiled: str = "auto"):
        self.direction = check_choice(direction, ("forward", "reverse"), "direction", self.name)
        self.reduction = check_choice(reduction, ("sample", "batch"), "reduction", self.name)
        self.tie = check_choice(tie, ("subject", "style"), "tie", self.name)
        self.mode = check_choice(mode, ("speculative", "two_pass"), "mode", self.name)
        self.compiled = check_choice(compiled, ("auto", "kernels", "plain"), "compiled", self.name)
        self._flags = (self.direction == "forward", self.reduction == "batch", self.tie == "subject")
        self._n = 0

    @property
    def num_layers(self) -> int:
        return self._n

    def prepare(self, layers, device=None) -> None:
        self._n = len(validate_layers(layers, self.name))
        self._prev: list[torch.Tensor | None] = [None] * self._n  # (G, 2) speculative gates (Triton path)
        self._last: list[tuple | None] = [None] * self._n  # (gates, divergences) (G, 2) of the last call
        self._init: dict = {}
        self._tau = None

    def begin_step(self, progress: Progress) -> None:
        self._tau = progress.tau

    def decide(self, stats, num_samples: int, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row statistics -> (gates (G, 2) fp32 one-hot, divergences (G, 2) fp32), on the device."""
        k = stats.kl if self.direction == "forward" else stats.kl_reverse  # (M, 2)
        return self._decide_rows(k, num_samples, rows_per_sample)

    def _decide_rows(self, k: torch.Tensor, num_samples: int, rows_per_sample: int):
        """Per-row divergences k (M, 2) -> (gates (G, 2) fp32 one-hot, D (G, 2)): the reduction and tie rule."""
        if self.reduction == "sample":
            d = k.reshape(num_samples, rows_per_sample, 2).mean(dim=1)
        else:
            d = k.mean(dim=0, keepdim=True).expand(num_samples, 2)
        subject = d[:, 0] >= d[:, 1] if self.tie == "subject" else d[:, 0] > d[:, 1]
        return torch.stack((subject, ~subject), dim=1).to(torch.float32), d

    @torch.no_grad()  # the selection is a stop-gradient, as in the fused path
    def decide_from_outputs(self, f0: torch.Tensor, d_c: torch.Tensor, d_s: torch.Tensor, num_samples: int, *,
                            layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same decision as :meth:`layer_forward`, from a layer's output pieces instead of the fused
        kernel's statistics: for integrations that run the layer some other way (PEFT's own forward
        for DoRA, a quantized or offloaded base, autograd; conv LoRAs, channels as the softmax axis).

        f0 (..., N) the base output, d_c and d_s (..., N) the subject's and style's perturbations
        (their outputs minus f0; a variant such as DoRA gives its own), M = num_samples * R rows. Per
        row m, in fp32 (fp64 for fp64 inputs), centred as :func:`~lorafuse.kernels.kl_select_torch`::

            forward:  mu_i = E_p0[d_i],  k_i,m = log1p(E_p0[expm1(d_i - mu_i)])  = KL(p0 || p_i)
            reverse:  nu_i = E_pi[d_i],  k_i,m = log1p(E_pi[expm1(nu_i - d_i)])  = KL(p_i || p0)

        with p0 = softmax(f0_m), p_i = softmax(f0_m + d_i,m) over the N channels; then this method's
        reduction and tie rule (:meth:`decide`). Returns (gates (G, 2) fp32 one-hot, D (G, 2)), G =
        num_samples; with ``layer`` also kept as that layer's :meth:`last_decision` (for the gate log)."""
        if not (f0.shape == d_c.shape == d_s.shape) or f0.dim() == 0:
            raise ValueError(f"{self.name}: decide_from_outputs needs f0, d_c, d_s of one shape (..., N), got "
                             f"{tuple(f0.shape)}, {tuple(d_c.shape)}, {tuple(d_s.shape)}")
        N = f0.shape[-1]
        M = f0.numel() // N if N else 0
        G = int(num_samples)
        if G < 1 or M % G:
            raise ValueError(f"{self.name}: decide_from_outputs: {M} rows do not split into num_samples={num_samples}")
        dt = torch.float64 if f0.dtype == torch.float64 else torch.float32
        f = f0.detach().reshape(M, N).to(dt)
        d = torch.stack((d_c.detach().reshape(M, N), d_s.detach().reshape(M, N)), dim=1).to(dt)  # (M, 2, N)
        k = kl_divergences(f, d, self.direction == "forward")
        g, D = self._decide_rows(k.reshape(M, 2), G, M // G)
        if layer is not None:
            if not 0 <= layer < self._n:
                raise IndexError(f"{self.name}: layer {layer} out of range (prepared {self._n} layers)")
            self._last[layer] = (g, D)
        return g, D

    def _state(self, layer: int, G: int, device) -> torch.Tensor:
        prev = self._prev[layer]
        if prev is None or prev.shape[0] != G or prev.device != device:  # host-known shape info only
            prev = self._initial(device).expand(G, 2).clone()
            self._prev[layer] = prev
        return prev

    def _initial(self, device) -> torch.Tensor:
        """(1, 2) the speculative gates a layer starts from: the tie rule's LoRA."""
        init = self._init.get(device)
        if init is None:
            init = self._init[device] = torch.tensor([[1.0, 0.0] if self.tie == "subject" else [0.0, 1.0]],
                                                     device=device)
        return init

    def reset(self) -> None:
        """Every layer's speculative gates back to the initial ones, in place (no host sync): the
        next run starts from the same state, so identical runs give bit-identical outputs."""
        for prev in self._prev:
            if prev is not None:
                prev.copy_(self._initial(prev.device).expand_as(prev))

    def run_state(self) -> list[torch.Tensor | None]:
        """The speculative gates of every layer (the Triton path carries them from call to call)."""
        return self._prev

    def set_run_state(self, state: list[torch.Tensor | None] | None) -> None:
        """Continue a run with its own speculative gates; None: a new run's (allocated at each layer's
        first call, so the previous run's list stays that run's)."""
        self._prev = [None] * self._n if state is None else state

    def layer_forward(self, layer, x, weight, bias, packed: PackedLoRA, *, backend: str = "auto"):
        if torch.compiler.is_compiling():
            return self._traced_forward(x, weight, bias, packed, backend)
        if not 0 <= layer < self._n:
            raise IndexError(f"{self.name}: layer {layer} out of range (prepared {self._n} layers)")
        if self.mode == "speculative" and (backend == "torch" or (backend == "auto" and not x.is_cuda)):
            # the torch path (CPU): no speculative state; host-cheap checks, else kl_select's full ones
            out = kl_select_plain(x, weight, bias, packed, *self._flags)
            if out is not None:
                self._last[layer] = out[1:]
                return out[0]
        G = x.shape[0] if x.dim() >= 2 else 1
        shape = (G, 2) if x.dim() >= 2 else (2,)
        rows = max(1, (x.numel() // x.shape[-1] if x.shape[-1] else 0) // max(G, 1))
        if G == 0 or x.numel() == 0:
            return fused_lora_linear(x, weight, bias, packed, backend=backend)
        if self.mode == "two_pass":
            _, st = fused_lora_linear(x, weight, bias, packed, stats=True, backend=backend)
            g, d = self.decide(st, G, rows)
            self._last[layer] = (g, d)
            return fused_lora_linear(x, weight, bias, packed, gates=g.reshape(shape), backend=backend)
        y, g, d = kl_select(x, weight, bias, packed, self._state(layer, G, x.device), direction=self.direction,
                            reduction=self.reduction, tie=self.tie, backend=backend)
        self._last[layer] = (g, d)
        return y

    def _traced_forward(self, x, weight, bias, packed: PackedLoRA, backend: str):
        """:meth:`layer_forward` inside a compiled graph (module docstring): one traceable sequence, no
        read of the layer index or of per-layer state; the decision goes to ``packed.notes``."""
        if x.numel() == 0:
            return fused_lora_linear(x, weight, bias, packed, backend=backend)
        kernels = self.compiled == "kernels" or (self.compiled == "auto" and backend != "torch" and x.is_cuda)
        out = None if kernels else kl_select_traced(x, weight, bias, packed, *self._flags)
        if out is None:  # the Triton ops, or kl_select's full checks (and their errors)
            G = x.shape[0] if x.dim() >= 2 else 1
            state = torch.tensor([[1.0, 0.0] if self.tie == "subject" else [0.0, 1.0]], device=x.device).repeat(G, 1)
            out = kl_select(x, weight, bias, packed, state, direction=self.direction, reduction=self.reduction,
                            tie=self.tie, backend="triton" if kernels else "torch")
        packed.notes.decision = out[1:]
        return out[0]

    def decision_of(self, packed: PackedLoRA) -> Decision | None:
        """The decision of the last compiled call made with ``packed`` (a layer's pack; what
        :meth:`last_decision` is for eager calls): gates (G, 2) and ``stats["kl"]`` D (G, 2), new
        tensors (``fresh``); None when no compiled call used it yet."""
        got = packed.notes.decision
        if got is None:
            return None
        return Decision(got[0], self._tau, {"kl": got[1]}, fresh=True)

    def last_decision(self, layer: int) -> Decision:
        """Gates (G, 2) of the layer's last call and ``stats["kl"]``: the (G, 2) divergences D_i.
        The tensors are new for each call and never updated later (``fresh``: a log may keep them)."""
        last = self._last[layer]
        if last is None:
            return Decision(torch.zeros(1, 2), self._tau, {})
        return Decision(last[0], self._tau, {"kl": last[1]}, fresh=True)
