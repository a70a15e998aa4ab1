"""The implementations a benchmark compares, all for one patched linear layer.

Every provider is built from the same random :class:`Layer` (base W, b, a subject and a style LoRA,
gates, input x) and returns ``y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T`` as an (M, N) tensor, so
the smoke test can check that every benchmark times code that computes the same function:

- ``F.linear``       ``F.linear(x, W', b)`` with W' = W + the gated deltas merged at build time: the
                     merged-weights limit (same cost as the base linear alone).
- ``peft_eager``     a real ``peft`` LoRA ``Linear`` with both adapters active (``set_adapter([..])``);
                     gates are folded into PEFT's per-adapter ``scaling`` (a zero gate is still computed,
                     as PEFT does).
- ``torch_seq``      the best plain-torch sequence: ``fused_lora_linear(..., backend="torch")`` on a
                     :class:`PackedLoRA` (addmm, one shrink over the concatenated A, one in-place addmm_).
- ``klora_official`` an official-K-LoRA-style layer: per call, both dense ``B @ A`` products in fp32 and
                     both top-K (K = r_c * r_s) sums recomputed, then a dense fp32 delta GEMM
                     ``x.float() @ dW^T`` added to the base linear. The decision comes from the layer's
                     host-side gates (the official code branches on the top-K scores, a host sync); with
                     non one-hot gates dW is the gate-weighted sum of the two deltas.
- ``lorafuse_static`` ``fused_lora_linear(x, W, b, packed, gates)`` with 1-D gates, backend "auto"
                     (Triton on CUDA, the torch path on CPU, where it is the same code as ``torch_seq``).
- ``lorafuse_kl``    the same call with ``stats=True`` (per-row KL / energy statistics as well).
- ``merged_scratch`` what the static methods aim at: W + the selected delta merged once into a scratch
                     weight (lorafuse's packed factors, fp32 accumulation), then ``F.linear``.
- ``merged_flip``    the cost of a call on which a static decision flips (at most twice per layer per
                     image): re-merge into the scratch weight, then ``F.linear``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafuse.kernels import PackedLoRA, fused_lora_linear

from .options import PROVIDERS  # the names, kept torch-free for `lorafuse bench --help`

MERGED = ("F.linear", "merged_scratch")  # providers whose per-call work is the base linear only


@dataclass(frozen=True)
class Case:
    """One benchmark case: x (M, K) -> (M, N), a subject and a style LoRA of rank ``rank`` each."""

    M: int
    K: int
    N: int
    rank: int
    dtype: torch.dtype
    gates: tuple[float, float] = (1.0, 0.8)
    scales: tuple[float, float] = (1.0, 0.75)

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    @property
    def gate_name(self) -> str:
        return "onehot" if sum(g != 0 for g in self.gates) == 1 else "both"

    @property
    def active_rank(self) -> int:
        return sum(self.rank for g in self.gates if g != 0)


@dataclass
class Layer:
    """Random weights and input of one case on one device (x, W, b, loras = [(A, B, scale)], gates)."""

    case: Case
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    loras: list[tuple[torch.Tensor, torch.Tensor, float]]
    gates: torch.Tensor  # (2,) fp32 on the layer's device

    @property
    def nbytes(self) -> int:
        ts = [self.x, self.weight, self.bias] + [t for a, b, _ in self.loras for t in (a, b)]
        return sum(t.numel() * t.element_size() for t in ts) + self.x.shape[0] * self.weight.shape[0] * self.x.element_size()


def make_layer(case: Case, device: torch.device | str, seed: int = 0) -> Layer:
    """Random layer with realistic magnitudes (unit-variance outputs, LoRA deltas ~ 10% of them)."""
    g = torch.Generator().manual_seed(seed)
    M, K, N, r = case.M, case.K, case.N, case.rank

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=case.dtype)

    x = rnd(M, K)
    W = rnd(N, K, std=K**-0.5)
    b = rnd(N, std=0.1)
    loras = [(rnd(r, K, std=K**-0.5), rnd(N, r, std=0.3 * r**-0.5), s) for s in case.scales]
    gates = torch.tensor(case.gates, dtype=torch.float32, device=device)
    return Layer(case, x, W, b, loras, gates)


def reference(layer: Layer, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """``x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T`` on upcast inputs (fp64 on the CPU by default)."""
    up = lambda t: t.detach().to(device=device, dtype=dtype)  # noqa: E731
    x = up(layer.x)
    y = F.linear(x, up(layer.weight), up(layer.bias))
    for gate, (A, B, s) in zip(layer.case.gates, layer.loras):
        if gate != 0:
            y += gate * s * (x @ up(A).t()) @ up(B).t()
    return y


def _delta(layer: Layer, gates=None) -> torch.Tensor:
    """fp32 sum_i g_i s_i B_i A_i (N, K)."""
    gates = layer.case.gates if gates is None else gates
    dW = torch.zeros(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
    for gate, (A, B, s) in zip(gates, layer.loras):
        if gate != 0:
            dW.addmm_(B.float(), A.float(), alpha=gate * s)
    return dW


def _flinear(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    merged = (layer.weight.float() + _delta(layer)).to(layer.weight.dtype)
    x, b = layer.x, layer.bias
    return lambda: F.linear(x, merged, b)


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def peft_layer(layer: Layer) -> nn.Module:
    """A real ``peft.tuners.lora.Linear`` around the base weights, adapters "subject" and "style" active."""
    from peft import LoraConfig, inject_adapter_in_model

    N, K = layer.weight.shape
    base = nn.Linear(K, N, bias=True, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        base.bias.copy_(layer.bias)
    model = _Holder(base)
    names = ("subject", "style")
    for name, (A, _, _) in zip(names, layer.loras):
        cfg = LoraConfig(r=A.shape[0], lora_alpha=A.shape[0], target_modules=["proj"], lora_dropout=0.0)
        with warnings.catch_warnings():  # "already found a peft_config" for the second adapter
            warnings.simplefilter("ignore")
            inject_adapter_in_model(cfg, model, adapter_name=name)
    lin = model.proj
    lin.set_adapter(list(names))
    with torch.no_grad():
        for name, gate, (A, B, s) in zip(names, layer.case.gates, layer.loras):
            lin.lora_A[name].weight.copy_(A)
            lin.lora_B[name].weight.copy_(B)
            lin.scaling[name] = gate * s
    lin.to(device=layer.weight.device, dtype=layer.weight.dtype).eval().requires_grad_(False)
    return lin


def _peft(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    lin, x = peft_layer(layer), layer.x
    return lambda: lin(x)


def _packed(layer: Layer) -> PackedLoRA:
    return PackedLoRA.pack(layer.loras, dtype=layer.x.dtype, device=layer.x.device)


def _torch_seq(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    x, W, b, g, p = layer.x, layer.weight, layer.bias, layer.gates, _packed(layer)
    return lambda: fused_lora_linear(x, W, b, p, g, backend="torch")


def _klora(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    x, W, b = layer.x, layer.weight, layer.bias
    (Ac, Bc, sc), (As, Bs, ss) = [(A.float(), B.float(), s) for A, B, s in layer.loras]  # fp32 LoRA tensors
    k = Ac.shape[0] * As.shape[0]
    gc, gs = layer.case.gates

    def run() -> torch.Tensor:
        dWc, dWs = Bc @ Ac, Bs @ As
        # the scores are what the official code recomputes every call; the decision here is the
        # case's gate, so they are computed and not used (eager torch does the work all the same)
        torch.topk(dWc.abs().flatten(), k).values.sum(), torch.topk(dWs.abs().flatten(), k).values.sum()
        if gs == 0:
            dW = dWc.mul_(gc * sc)
        elif gc == 0:
            dW = dWs.mul_(gs * ss)
        else:
            dW = dWc.mul_(gc * sc).add_(dWs, alpha=gs * ss)
        return F.linear(x, W, b) + (x.float() @ dW.t()).to(x.dtype)

    return run


def _lorafuse_static(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    x, W, b, g, p = layer.x, layer.weight, layer.bias, layer.gates, _packed(layer)
    return lambda: fused_lora_linear(x, W, b, p, g, backend=backend)


def _lorafuse_kl(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    x, W, b, g, p = layer.x, layer.weight, layer.bias, layer.gates, _packed(layer)
    return lambda: fused_lora_linear(x, W, b, p, g, stats=True, backend=backend)[0]


def _merge_into(scratch: torch.Tensor, W: torch.Tensor, p: PackedLoRA, coef: torch.Tensor) -> torch.Tensor:
    """scratch = W + (b_compact * coef) a_compact, accumulated in fp32, rounded once."""
    merged = torch.addmm(W.float(), p.b_compact.float() * coef, p.a_compact.float())
    return scratch.copy_(merged)


def _merged_parts(layer: Layer):
    p = _packed(layer)
    coef = layer.gates.index_select(0, p.compact_lora.to(layer.gates.device))  # (sum r_i,) fp32
    return p, coef, torch.empty_like(layer.weight)


def _merged_scratch(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    p, coef, scratch = _merged_parts(layer)
    _merge_into(scratch, layer.weight, p, coef)
    x, b = layer.x, layer.bias
    return lambda: F.linear(x, scratch, b)


def _merged_flip(layer: Layer, backend: str) -> Callable[[], torch.Tensor]:
    p, coef, scratch = _merged_parts(layer)
    x, W, b = layer.x, layer.weight, layer.bias

    def run() -> torch.Tensor:
        _merge_into(scratch, W, p, coef)
        return F.linear(x, scratch, b)

    return run


_BUILDERS = {
    "F.linear": _flinear,
    "peft_eager": _peft,
    "torch_seq": _torch_seq,
    "klora_official": _klora,
    "lorafuse_static": _lorafuse_static,
    "lorafuse_kl": _lorafuse_kl,
    "merged_scratch": _merged_scratch,
    "merged_flip": _merged_flip,
}


def build(name: str, layer: Layer, backend: str = "auto") -> Callable[[], torch.Tensor]:
    """A no-argument callable running provider ``name`` on ``layer`` (``backend`` for the lorafuse ones)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    return _BUILDERS[name](layer, backend)


def work(case: Case, provider: str) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one call: each input read once, y written once. Merged providers do the
    base linear only; the others also the shrink and expand of the active LoRAs."""
    M, K, N = case.M, case.K, case.N
    el = torch.finfo(case.dtype).bits // 8
    flops, nbytes = 2.0 * M * K * N, el * (M * K + N * K + N + M * N)
    if provider not in MERGED:
        R = case.active_rank
        flops += 2.0 * M * R * (K + N)
        nbytes += el * R * (K + N)
    if provider == "merged_flip":  # plus the re-merge: read W, write the scratch weight
        flops += 2.0 * N * K * case.active_rank
        nbytes += el * 2 * N * K
    return flops, nbytes
