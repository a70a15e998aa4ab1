"""The fusion-method interface: the contract between the integrations and the methods.

Life cycle, driven by an integration (diffusers) or by hand:

1. ``method.prepare(layers, device)`` once: ``layers[l]`` is a :class:`LayerLoRAs` for patched layer
   l (index = registration order). The factors are the deltas the user actually loaded, i.e. scale
   already applied by the caller's convention: dW_i = scale_i * B_i A_i. The method computes its
   static per-layer state here (scores, gamma, flip tables) and preallocates its device tensors.
2. ``method.begin_step(progress)`` once per denoiser call (from a forward pre-hook), with a
   :class:`Progress`. Must not sync with the host: tau may be a device tensor.
3. ``method.layer_forward(l, x, weight, bias, packed, backend=...)`` for every call of layer l inside
   that denoiser call: returns y = x W^T + b + sum_i g_i d_i with the method's gates g (2 LoRAs,
   subject first), computed through :mod:`lorafuse.kernels`. ``packed`` is the layer's
   :class:`~lorafuse.kernels.PackedLoRA` of (subject, style) with the *current* scales folded in.
4. ``method.last_decision(l)`` -> :class:`Decision` for logging (device tensors; the caller decides
   when to copy them to the host).
5. ``method.reset()`` when a new sampling run starts (before its first ``begin_step``); with several
   runs interleaved (concurrent requests through one installation, their denoiser calls one at a
   time): ``state = method.run_state()`` when another run's call comes next and
   ``method.set_run_state(state)`` (None: a new run) when this run's call comes back.

Methods whose gates do not depend on the layer's input (K-LoRA, EST, merge) also answer
``method.layer_gates(l)`` (the gates of this call, and a host key of them when the host knows them):
an integration may then run the layer on merged weights ``W + sum_i g_i dW_i``, rebuilt only when
the gates change, instead of calling ``layer_forward``.

Methods never import diffusers; they call kernels and plain torch ops on small tensors.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch

from ..kernels import PackedLoRA

SUBJECT, STYLE = 0, 1


@dataclass(frozen=True)
class LayerLoRAs:
    """One patched linear's two LoRAs: A (r, K), B (N, r), scale (float or 0-d tensor)."""

    name: str
    subject: tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]
    style: tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]


@dataclass
class Progress:
    """Where the sampler is: ``tau`` in [0, 1] (0 = first, noisiest step), as a float or a 0-d tensor
    (device tensors keep the per-step path free of host syncs). ``step`` counts denoiser calls from 0
    and ``num_steps`` is the sampler's step count when known (the official counter mode needs both);
    ``timestep`` is the raw value the denoiser received, for logs."""

    tau: float | torch.Tensor
    step: int = 0
    num_steps: int | None = None
    timestep: float | torch.Tensor | None = None


@dataclass
class Decision:
    """The last gates a layer applied: ``gates`` (G, 2) fp32 (G = 1 for per-layer methods, batch for
    per-sample ones), ``tau`` as used, and method statistics (name -> tensor or float). ``fresh``:
    the tensors were made for this decision and nothing updates them later, so a log may keep them
    without copying (False: they may be views of live state)."""

    gates: torch.Tensor
    tau: float | torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    fresh: bool = False


class FusionMethod(abc.ABC):
    """Base class of the methods ("klora", "est", "kl", "merge", "subject", "style")."""

    name: str = "base"
    #: True when gates depend on the forward's own statistics (needs the kernel's STATS epilogue)
    dynamic: bool = False
    #: set by an integration to show progress: ``progress(iterable, total)`` wraps the per-layer loop
    #: of a slow :meth:`prepare` (e.g. a tqdm bar); None: no progress display
    progress = None

    @abc.abstractmethod
    def prepare(self, layers: Sequence[LayerLoRAs], device: torch.device | str | None = None) -> None:
        """Compute the static per-layer state once (see the module docstring)."""

    @abc.abstractmethod
    def begin_step(self, progress: Progress) -> None:
        """Update the gates for a new denoiser call, in place, without host syncs."""

    @abc.abstractmethod
    def layer_forward(
        self,
        layer: int,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        packed: PackedLoRA,
        *,
        backend: str = "auto",
    ) -> torch.Tensor:
        """y for layer ``layer`` with the current gates; x (..., K) -> (..., N)."""

    @abc.abstractmethod
    def last_decision(self, layer: int) -> Decision:
        """What layer ``layer`` applied on its last call."""

    def decision_of(self, packed: PackedLoRA) -> Decision | None:
        """What the last layer call made with ``packed`` inside a ``torch.compile`` graph applied, for a
        method whose graph cannot keep it by layer index (a Python int read in a graph specialises it
        on that layer); None (the default): :meth:`last_decision` or :meth:`step_decisions` has it."""
        return None

    def reset(self) -> None:
        """Forget per-run state (e.g. speculative gates carried from call to call): called when a new
        sampling run starts, so identical runs give identical outputs. Default: nothing to forget."""

    def run_state(self) -> Any:
        """The per-run state the method holds now (what :meth:`reset` would forget), for
        :meth:`set_run_state` when this run continues after another run's calls; the method may keep
        using the objects (the next :meth:`set_run_state` replaces them). Default: None (the gates
        of :meth:`begin_step` depend on its progress alone)."""
        return None

    def set_run_state(self, state: Any) -> None:
        """Continue the run whose :meth:`run_state` was ``state``; None: a new run. Default:
        :meth:`reset` for None. A method that keeps per-run state overrides both."""
        if state is None:
            self.reset()

    def layer_gates(self, layer: int) -> tuple[torch.Tensor, Hashable | None] | None:
        """The gates layer ``layer`` applies on this call, for methods whose gates do not depend on
        the layer's input: ``(row, key)`` with ``row`` the (2,) fp32 gates (a device tensor) and
        ``key`` a hashable host value that is equal for equal rows, or None when only the device
        knows the row (it is then fixed between :meth:`begin_step` calls and every layer's row is
        in :meth:`step_decisions`). Counts as the layer's call, like :meth:`layer_forward`.
        None (the default): the gates depend on the input, only :meth:`layer_forward` applies them."""
        return None

    def step_decisions(self) -> Decision | None:
        """Every layer's decision for the current denoiser call at once, for methods whose gates are
        fixed between :meth:`begin_step` calls: ``gates`` (num_layers, 2) and stats of shape
        (num_layers,) or 0-d (shared), views of live state. Loggers then copy one snapshot per
        denoiser call instead of one per layer call. None (the default): ask :meth:`last_decision`
        after each layer call."""
        return None

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Number of layers given to :meth:`prepare`."""
