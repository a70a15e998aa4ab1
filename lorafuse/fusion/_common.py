"""Shared pieces of the fusion methods: layer validation, the balance gamma, and the static
"select one LoRA per layer from a flip table" machinery of K-LoRA and EST-LoRA."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels import PackedLoRA, fused_lora_linear
from .base import Decision, FusionMethod, LayerLoRAs, Progress
from .schedule import check_pattern, official_tau, time_scale, write_tau

TAU_MODES = ("timestep", "official")
_ROLES = ("subject", "style")


def _lora(layer, role: str, idx: int, what: str):
    item = getattr(layer, role, None)
    name = getattr(layer, "name", f"#{idx}")
    if item is None:
        raise ValueError(f"{what}: layer {idx} ({name}) has no {role} LoRA; fusion needs a subject and a style LoRA")
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise TypeError(f"{what}: layer {idx} ({name}) {role} LoRA must be an (A, B, scale) triple")
    A, B, scale = item
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise TypeError(f"{what}: layer {idx} ({name}) {role}: A and B must be tensors")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise TypeError(f"{what}: layer {idx} ({name}) {role}: A and B must be floating point")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
        raise ValueError(
            f"{what}: layer {idx} ({name}) {role}: need A (r, K) and B (N, r) with r >= 1, "
            f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{what}: layer {idx} ({name}) {role}: scale must be a float or a 0-d tensor")
        scale = float(scale)  # preparation time: one sync is fine
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{what}: layer {idx} ({name}) {role}: scale must be a float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise ValueError(f"{what}: layer {idx} ({name}) {role} LoRA has non-finite weights or scale")
    return A, B, float(scale)


def validate_layers(layers, what: str) -> list[tuple[tuple, tuple]]:
    """Check ``layers`` (a non-empty sequence of :class:`LayerLoRAs`) and return per layer
    ``((A_c, B_c, s_c), (A_s, B_s, s_s))`` with float scales. Errors name the layer and the problem:
    a missing LoRA, bad shapes, subject/style of different target shapes, non-finite weights."""
    if isinstance(layers, LayerLoRAs) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"{what}: prepare needs a non-empty sequence of LayerLoRAs")
    out = []
    for idx, layer in enumerate(layers):
        c, s = (_lora(layer, role, idx, what) for role in _ROLES)
        (Ac, Bc, _), (As, Bs, _) = c, s
        if Ac.shape[1] != As.shape[1] or Bc.shape[0] != Bs.shape[0]:
            raise ValueError(
                f"{what}: layer {idx} ({getattr(layer, 'name', '')}): subject LoRA targets "
                f"({Bc.shape[0]} x {Ac.shape[1]}) but style LoRA targets ({Bs.shape[0]} x {As.shape[1]})"
            )
        out.append((c, s))
    return out


BALANCES = ("official", "paper")


def balance_gamma(num_c: torch.Tensor, num_s: torch.Tensor, mode: str) -> float:
    """gamma from per-layer fp64 statistics (L,) of the subject (num_c) and style (num_s) deltas.

    "official" (K-LoRA code): rho_j = num_c_j / num_s_j over layers with num_s_j > 0, drop
        rho_j >= 3 mean(rho), gamma = mean of the rest.
    "paper" / "energy": gamma = sum_j num_c_j / sum_j num_s_j (L1 norms, or energies for "energy").

    A degenerate result (no usable layer, gamma 0 or non-finite: a zero LoRA) falls back to 1, which
    keeps every decision defined (a zero subject then always loses, a zero style always loses to a
    non-zero subject).
    """
    if mode == "official":
        ok = num_s > 0
        rho = num_c[ok] / num_s[ok]
        if rho.numel() == 0:
            return 1.0
        mean = rho.mean()
        kept = rho[rho < 3 * mean]
        gamma = float(kept.mean()) if kept.numel() else float(mean)
    else:
        gamma = float(num_c.sum() / num_s.sum()) if float(num_s.sum()) > 0 else 1.0
    return gamma if math.isfinite(gamma) and gamma > 0 else 1.0


def check_choice(value, choices, option: str, what: str):
    if value not in choices:
        raise ValueError(f"{what}: {option} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float(value, option: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}: {option} must be a finite float, got {value!r}")
    return float(value)


class StaticSelectMethod(FusionMethod):
    """One LoRA per layer and step: subject iff ``num_l > den_l * S(tau)`` (strict; ties to style),
    with ``num_l = score_c,l / gamma`` and ``den_l = score_s,l`` fixed at :meth:`prepare` (fp64).

    Gates (L, 2) fp32 live on the device; :meth:`begin_step` rewrites all of them at once from tau
    (a float or a 0-d tensor) with a fixed handful (about a dozen, independent of L) of tiny tensor ops and no host read. With
    ``tau_mode="official"`` tau is the official counter's ``((k L + l) mod (L N)) / (L N)`` for the
    l-th layer call (1-based, execution order) of denoiser call k = ``progress.step``, evaluated on
    the host from Python ints and floats in :meth:`layer_forward` (no sync either): the layer then
    gets one of two constant one-hot device rows.
    """

    def __init__(self, *, pattern: str, alpha: float, beta: float | None, balance: str, tau_mode: str,
                 stats_backend: str, balances=BALANCES):
        what = self.name
        self.pattern = check_pattern(pattern, what)
        self.alpha = check_float(alpha, "alpha", what)
        if pattern == "s*" and self.alpha <= 0:
            raise ValueError(f"{what}: pattern 's*' takes S(tau) = (alpha tau + beta) mod alpha and needs alpha > 0, "
                             f"got {alpha!r}")
        self.beta = None if beta is None else check_float(beta, "beta", what)
        self.balance = check_choice(balance, balances, "balance", what)
        self.tau_mode = check_choice(tau_mode, TAU_MODES, "tau_mode", what)
        self.stats_backend = check_choice(stats_backend, ("auto", "triton", "torch"), "stats_backend", what)
        self._n = 0

    # subclasses: per-layer (score_c, score_s, balance_c, balance_s) as fp64 0-d tensors
    def _layer_stats(self, subject: tuple, style: tuple) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return self._n

    def scale(self, tau):
        """S(tau) of this method's pattern."""
        return time_scale(tau, self.pattern, self.alpha, self.beta)

    @torch.no_grad()  # statistics of the loaded weights (PEFT keeps them as trainable Parameters)
    def prepare(self, layers, device=None) -> None:
        pairs = validate_layers(layers, self.name)
        device = torch.device(device) if device is not None else pairs[0][0][0].device
        per_layer = pairs if self.progress is None else self.progress(pairs, len(pairs))
        st = torch.stack([torch.stack([t.to("cpu", torch.float64) for t in self._layer_stats(c, s)])
                          for c, s in per_layer])
        self.scores = st[:, :2].clone()  # (L, 2) fp64 on the host, for logs and references
        self.gamma = balance_gamma(st[:, 2], st[:, 3], self.balance)
        num, den = st[:, 0] / self.gamma, st[:, 1]
        self._num_host, self._den_host = num.tolist(), den.tolist()
        self._num, self._den = num.to(device), den.to(device)
        L = self._n = len(pairs)
        self._device = device
        self._tau = torch.zeros((), dtype=torch.float64, device=device)
        self._subj = torch.zeros(L, dtype=torch.float32, device=device)
        self._gates = torch.zeros(L, 2, dtype=torch.float32, device=device)
        self._onehot = torch.eye(2, dtype=torch.float32, device=device)
        self._step, self._num_steps, self._call = 0, None, 0
        self._last_official = [None] * L  # (subject?, tau) per layer in official mode
        self._flags = None  # host copy of the gates' subject column after a host-side update
        self._S = self._update(0.0)

    def _update(self, tau) -> torch.Tensor | float:
        """Gates of every layer at ``tau``: ``g_l = (1, 0)`` iff ``score_c / gamma > score_s S(tau)``
        (fp64), else (0, 1); returns S(tau). A tensor tau stays on its device (no host sync). A float
        tau (a CPU run: the host knows the timestep) is decided on the host with the same fp64 rule,
        bit for bit (the scores' host copies, S by the same IEEE steps), and the device gates are
        written only when some layer flips: most steps then cost one ``fill_`` and leave the gates
        tensor untouched (its version counter tells readers nothing changed)."""
        if isinstance(tau, torch.Tensor):
            self._flags = None
            S = self.scale(write_tau(tau, self._tau, self.name))
            t = self._den * S
            torch.gt(self._num, t, out=self._gates[:, 0])  # scores are finite: le is the exact complement
            torch.le(self._num, t, out=self._gates[:, 1])
            return S
        write_tau(tau, self._tau, self.name)
        self._tau_host = float(tau)
        S = self.scale(self._tau_host)
        flags = [n > d * S for n, d in zip(self._num_host, self._den_host)]
        if flags != self._flags:
            self._gates.copy_(torch.tensor([(1.0, 0.0) if f else (0.0, 1.0) for f in flags], dtype=torch.float32))
            self._flags = flags
        return S

    def begin_step(self, progress: Progress) -> None:
        if not hasattr(self, "_gates"):
            raise RuntimeError(f"{self.name}: call prepare(layers) before begin_step")
        if self.tau_mode == "official":
            if progress.num_steps is None or int(progress.num_steps) < 1:
                raise ValueError(f"{self.name}: tau_mode='official' needs progress.num_steps (the sampler's step count)")
            self._step, self._num_steps, self._call = int(progress.step), int(progress.num_steps), 0
            return
        self._S = self._update(progress.tau)

    def gates(self, layer: int) -> torch.Tensor:
        """The (2,) gate row layer ``layer`` uses now (official mode: advances the call counter)."""
        if self.tau_mode != "official":
            return self._gates[layer]
        if self._num_steps is None:
            raise ValueError(f"{self.name}: tau_mode='official' needs begin_step(Progress(..., num_steps=N)) first")
        self._call += 1
        tau = official_tau(self._step, self._call, self._n, self._num_steps)
        subject = self._num_host[layer] > self._den_host[layer] * self.scale(tau)
        self._last_official[layer] = (subject, tau)
        return self._onehot[0 if subject else 1]

    def layer_forward(self, layer, x, weight, bias, packed: PackedLoRA, *, backend: str = "auto"):
        return fused_lora_linear(x, weight, bias, packed, gates=self.gates(layer), backend=backend)

    def layer_gates(self, layer: int):
        """``(row, key)``: timestep mode ``(gates[layer], None)`` (device only); official mode the
        one-hot row and ``key`` True for the subject, False for the style (host-side)."""
        row = self.gates(layer)
        return row, (self._last_official[layer][0] if self.tau_mode == "official" else None)

    @torch.no_grad()
    def layer_scores(self, subject: tuple, style: tuple) -> tuple[float, float]:
        """(score_c, score_s) fp64 of a layer this method was not prepared with (an integration's
        conv LoRA flattened to A (r, K) and B (N, r), say), as :meth:`prepare` scores its layers:
        ``subject`` / ``style`` are (A, B, scale) triples. Validated like :meth:`prepare`'s layers."""
        (c, st), = validate_layers([LayerLoRAs("extra layer", subject, style)], self.name)
        stats = self._layer_stats(c, st)
        return float(stats[0].double()), float(stats[1].double())

    def extra_gates(self, score_c: float, score_s: float) -> torch.Tensor:
        """(2,) fp32 one-hot gates, now, of a layer outside the prepared ones with scores from
        :meth:`layer_scores`: the same rule, ``score_c / gamma > score_s * S(tau)`` (strict), with the
        prepared gamma and this step's S(tau) (fp64; a device op, no host read). In official tau mode
        such a layer is not in the official call counter: tau is the step fraction k / N."""
        if not hasattr(self, "_gates"):
            raise RuntimeError(f"{self.name}: call prepare(layers) before extra_gates")
        num = score_c / self.gamma
        if self.tau_mode == "official":
            S = self.scale(self._step / self._num_steps if self._num_steps else 0.0)
            return self._onehot[0 if num > score_s * S else 1]
        subject = torch.gt(torch.full_like(self._S, num), self._S * score_s) if isinstance(self._S, torch.Tensor) \
            else torch.tensor(num > score_s * self._S, device=self._device)
        return torch.stack((subject, ~subject)).to(torch.float32)

    def decision_table(self, taus) -> torch.Tensor:
        """(L, T) bool on the host, True where layer l selects the subject at ``taus[t]``: the same
        rule and fp64 scores the device gates use (``score_c / gamma > score_s * S(tau)``), for logs,
        ``lorafuse inspect`` and references. Needs :meth:`prepare`; no device work."""
        if not hasattr(self, "_num_host"):
            raise RuntimeError(f"{self.name}: call prepare(layers) before decision_table")
        num = torch.tensor(self._num_host, dtype=torch.float64)[:, None]
        den = torch.tensor(self._den_host, dtype=torch.float64)[:, None]
        scale = torch.tensor([self.scale(float(t)) for t in taus], dtype=torch.float64)
        return num > den * scale

    def step_decisions(self) -> Decision | None:
        """All layers' gates (L, 2), tau and stats (``subject_score`` / ``style_score`` (L,),
        ``time_scale`` 0-d) of the current step; None in official mode (tau changes per layer call)."""
        if self.tau_mode == "official" or not hasattr(self, "_gates"):
            return None
        return Decision(self._gates, self._tau_now(), {"subject_score": self._num, "style_score": self._den,
                                                       "time_scale": self._S})

    def last_decision(self, layer: int) -> Decision:
        """Gates (1, 2) and tau of the layer's last call; stats ``subject_score`` (score_c / gamma),
        ``style_score`` (score_s), ``time_scale`` S(tau). Tensors are views of live state."""
        stats = {"subject_score": self._num[layer], "style_score": self._den[layer]}
        if self.tau_mode == "official":
            subject, tau = self._last_official[layer] or (None, None)
            if subject is None:
                return Decision(self._gates.new_zeros(1, 2), None, stats)
            return Decision(self._onehot[0 if subject else 1].reshape(1, 2), tau, dict(stats, time_scale=self.scale(tau)))
        return Decision(self._gates[layer : layer + 1], self._tau_now(), dict(stats, time_scale=self._S))

    def _tau_now(self):
        """The step's tau: the host float of a host-side update (no tensor to copy), else the 0-d tensor."""
        return self._tau_host if self._flags is not None else self._tau
