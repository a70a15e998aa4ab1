"""Public entry points of the kernels: argument checks, backend dispatch, torch.library ops.

Triton launches go through ``torch.library.triton_op`` custom ops (``lorafuse::fused_lora_linear``,
``lorafuse::lora_fixup``), so ``torch.compile`` traces into the kernels and CUDA graphs capture them;
the torch reference is the CPU path and the fallback.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ._common import HAS_TRITON, check_dtype, resolve_backend, traceable
from .fused_lora_linear import (
    fused_gemm_expand_torch,
    fused_lora_linear_torch,
    gemm_block_n,
    launch_fused_gemm_expand,
    num_stat_columns,
    row_gates,
)
from .lora_fixup import launch_lora_fixup, lora_fixup_torch
from .lora_stats import LoRAStats, reduce_lora_stats
from .packing import PackedLoRA, check_not_bare_triple
from .shrink import launch_lora_shrink, lora_shrink_torch

_WHAT = "fused_lora_linear"


def _fused_backward_math(ctx, grad_y, grad_u):
    """Gradients of ``y = x W^T + bias + (U * g) b^T`` with ``U = x a^T`` (g expanded to U's columns,
    one row per token) and of the returned U itself, in fp32 (fp64 for fp64 inputs)::

        gU = (dy b) * g + dU            dx = dy W + gU a          dW = dy^T x     dbias = sum_rows dy
        da = gU^T x                     db = dy^T (U * g)         dg[s, i] = sum_{m in s, c in block i} (dy b * U)[m, c]

    Plain torch ops (cuBLAS on a GPU), so the backward runs the same on every backend and is itself
    differentiable. Returns the gradients of (x, weight, bias, a, b, gates) in their dtypes, None
    for those that need none.
    """
    x, weight, a, b, gates, u = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_g = ctx.needs_input_grad[:6]
    M, L = x.shape[0], len(ctx.ranks)
    R = a.shape[0] // L
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    gy = grad_y.to(work) if grad_y is not None else torch.zeros(M, weight.shape[0], dtype=work, device=x.device)
    gcol = None
    if gates is not None:
        gcol = row_gates(gates, M, ctx.rows_per_sample, L, work).repeat_interleave(R, dim=1)  # (M, L*R)
    gyb = gy @ b.to(work)  # dL/d(U * g)
    gU = gyb * gcol if gcol is not None else gyb
    if grad_u is not None:
        gU = gU + grad_u.to(work)
    x_w = x.to(work)
    dx = (gy @ weight.to(work) + gU @ a.to(work)).to(x.dtype) if need_x else None
    dW = (gy.t() @ x_w).to(weight.dtype) if need_w else None
    dbias = gy.sum(0).to(weight.dtype) if need_bias else None
    da = (gU.t() @ x_w).to(a.dtype) if need_a else None
    db = None
    if need_b:
        ug = u.to(work) * gcol if gcol is not None else u.to(work)
        db = (gy.t() @ ug).to(b.dtype)
    dg = None
    if need_g and gates is not None and M == 0:
        dg = torch.zeros_like(gates)
    elif need_g and gates is not None:
        per_row = (gyb * u.to(work)).view(M, L, R).sum(2)  # (M, L)
        dg = per_row.sum(0, keepdim=True) if gates.shape[0] == 1 else per_row.view(gates.shape[0], -1, L).sum(1)
        dg = dg.to(gates.dtype)
    return dx, dW, dbias, da, db, dg


if HAS_TRITON:
    from torch.library import triton_op

    @triton_op("lorafuse::fused_lora_linear", mutates_args=())
    def _fused_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        gates: torch.Tensor | None,
        rows_per_sample: int,
        ranks: list[int],
        stats: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M, N = x.shape[0], weight.shape[0]
        u = torch.empty((M, a.shape[0]), dtype=torch.float32, device=x.device)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        tiles = -(-N // gemm_block_n(x.device)) if stats else 0
        part = torch.empty((tiles, M, num_stat_columns(len(ranks))), dtype=torch.float32, device=x.device)
        if M > 0:
            launch_lora_shrink(x, a, u, wrap=traceable)
            launch_fused_gemm_expand(
                x, weight, bias, u, b, gates, y, part if stats else None, rows_per_sample, ranks, stats,
                wrap=traceable,
            )
        return y, u, part

    @_fused_op.register_fake
    def _fused_op_fake(x, weight, bias, a, b, gates, rows_per_sample, ranks, stats):
        # explicit, so shape propagation never reaches a launcher (the interpreter would run it)
        M, N = x.shape[0], weight.shape[0]
        tiles = -(-N // gemm_block_n(x.device)) if stats else 0
        return (
            x.new_empty((M, N)),
            x.new_empty((M, a.shape[0]), dtype=torch.float32),
            x.new_empty((tiles, M, num_stat_columns(len(ranks))), dtype=torch.float32),
        )

    def _fused_setup_context(ctx, inputs, output):
        x, weight, bias, a, b, gates, rows_per_sample, ranks, stats = inputs
        ctx.save_for_backward(x, weight, a, b, gates, output[1])
        ctx.rows_per_sample, ctx.ranks = rows_per_sample, list(ranks)
        ctx.mark_non_differentiable(output[2])  # statistics partials: decisions, not a loss

    def _fused_backward(ctx, grad_y, grad_u, grad_part):
        return (*_fused_backward_math(ctx, grad_y, grad_u), None, None, None)

    _fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)

    @triton_op("lorafuse::lora_fixup", mutates_args={"y"})
    def _fixup_op(
        y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, delta_gates: torch.Tensor, rows_per_sample: int,
        ranks: list[int],
    ) -> None:
        if y.shape[0] > 0:
            launch_lora_fixup(y, u, b, delta_gates, rows_per_sample, ranks, wrap=traceable)

    @_fixup_op.register_fake
    def _fixup_op_fake(y, u, b, delta_gates, rows_per_sample, ranks):
        return None


class FusedForward(NamedTuple):
    """Everything one fused call produces, for callers that go on with it (the speculative KL path).

    y: (..., N) output; u: (M, L*R) fp32 shrink (ungated, padded blocks; None from the torch backend
    without statistics, which works on the unpadded factors); partials: (tiles, M, 2 + 5L) fp32
    statistics partials or None; packed: the :class:`PackedLoRA` used; rows_per_sample: rows of one
    gate sample.
    """

    y: torch.Tensor
    u: torch.Tensor
    partials: torch.Tensor | None
    packed: PackedLoRA
    rows_per_sample: int


def _same_device(name: str, t: torch.Tensor, device: torch.device, what: str) -> None:
    if t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device} but x is on {device}")


def check_gates(gates, x: torch.Tensor, num_loras: int, what: str = _WHAT) -> tuple[torch.Tensor | None, int]:
    """Validate ``gates`` and return them as fp32 (G, L) plus the number of rows per gate sample."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if gates is None:
        return None, max(M, 1)
    if not isinstance(gates, torch.Tensor):
        raise TypeError(f"{what}: gates must be a tensor or None, got {type(gates).__name__}")
    _same_device("gates", gates, x.device, what)
    if not (gates.is_floating_point() or gates.dtype == torch.bool):
        raise TypeError(f"{what}: gates must be a float tensor, got {gates.dtype}")
    if gates.dim() == 1 and gates.shape[0] == num_loras:
        return gates.to(torch.float32).reshape(1, num_loras).contiguous(), max(M, 1)
    if gates.dim() == 2 and gates.shape[1] == num_loras:
        if x.dim() < 2 or gates.shape[0] != x.shape[0]:
            raise ValueError(
                f"{what}: per-sample gates must be (batch, {num_loras}) with batch = x.shape[0] = "
                f"{x.shape[0] if x.dim() >= 2 else 'n/a (x is 1-D)'}, got {tuple(gates.shape)}"
            )
        # max(1, .): zero-token samples (M = 0) still have a well-defined (unused) row count
        return gates.to(torch.float32).contiguous(), max(1, M // x.shape[0]) if x.shape[0] else 1
    raise ValueError(
        f"{what}: gates must be ({num_loras},) or (batch, {num_loras}) for {num_loras} LoRAs, got {tuple(gates.shape)}"
    )


def prepare_loras(loras, x: torch.Tensor, what: str = _WHAT) -> PackedLoRA:
    """Pack raw ``(A, B, scale)`` triples in x's dtype, or check a :class:`PackedLoRA` against x.

    A bare ``(A, B, scale)`` triple where the list of triples belongs is a ValueError that says so.
    """
    check_not_bare_triple(loras, what)
    if isinstance(loras, PackedLoRA):
        if loras.dtype != x.dtype:
            raise TypeError(f"{what}: packed LoRAs are {loras.dtype} but x is {x.dtype}; use packed.to(dtype=...)")
        _same_device("the packed LoRAs", loras.a, x.device, what)
        return loras
    if isinstance(loras, (list, tuple)):
        for i, item in enumerate(loras):
            if isinstance(item, (list, tuple)) and len(item) == 3:
                for name, t in zip(("A", "B"), item[:2]):
                    if isinstance(t, torch.Tensor):
                        _same_device(f"LoRA {i} {name}", t, x.device, what)
    return PackedLoRA.pack(loras, dtype=x.dtype, device=x.device)


def fused_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    loras: Sequence | PackedLoRA,
    gates: torch.Tensor | None = None,
    *,
    stats: bool = False,
    backend: str = "auto",
) -> FusedForward:
    """:func:`fused_lora_linear` that also returns the shrink U and the raw statistics partials."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{_WHAT}: x and weight must be tensors")
    check_dtype("x", x, _WHAT)
    if x.dim() < 1:
        raise ValueError(f"{_WHAT}: x must have at least one dimension (..., K)")
    if weight.dim() != 2:
        raise ValueError(f"{_WHAT}: weight must be (N, K), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{_WHAT}: weight is {weight.dtype} but x is {x.dtype}; they must match")
    _same_device("weight", weight, x.device, _WHAT)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{_WHAT}: x has {x.shape[-1]} input features (last dim) but weight is (N={N}, K={K})")
    if K == 0 or N == 0:
        raise ValueError(f"{_WHAT}: weight is (N={N}, K={K}); a layer needs at least one input and one output feature")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{_WHAT}: bias must be a tensor or None")
        if bias.shape != (N,):
            raise ValueError(f"{_WHAT}: bias must be ({N},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{_WHAT}: bias is {bias.dtype} but x is {x.dtype}; they must match")
        _same_device("bias", bias, x.device, _WHAT)
    packed = prepare_loras(loras, x)
    if packed.in_features != K:
        raise ValueError(f"{_WHAT}: LoRA A has {packed.in_features} input features but x and weight have K={K}")
    if packed.out_features != N:
        raise ValueError(f"{_WHAT}: LoRA B has {packed.out_features} rows but weight has N={N} output features")
    g, rows_per_sample = check_gates(gates, x, packed.num_loras)
    L = packed.num_loras
    impl = resolve_backend(backend, x.device, _WHAT)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if impl == "triton":
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        y, u, part = _fused_op(x2, w, bias, packed.a, packed.b, g, rows_per_sample, list(packed.ranks), stats)
        return FusedForward(y.reshape(*lead, N), u, part if stats else None, packed, rows_per_sample)
    if not stats:
        y = fused_lora_linear_torch(x2, weight, bias, packed, g, rows_per_sample)
        return FusedForward(y.reshape(*lead, N), None, None, packed, rows_per_sample)
    u = lora_shrink_torch(x2, packed.a)
    y, part = fused_gemm_expand_torch(x2, weight, bias, u, packed.b, g, rows_per_sample, L, stats)
    return FusedForward(y.reshape(*lead, N), u, part, packed, rows_per_sample)


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    loras: Sequence | PackedLoRA,
    gates: torch.Tensor | None = None,
    *,
    stats: bool = False,
    backend: str = "auto",
):
    """Base linear plus gated LoRAs in one pass:

        y = x W^T + b + sum_i gates[.., i] * scale_i * (x A_i^T) B_i^T

    Args:
        x: (..., K) activations, fp16 / bf16 / fp32; any leading dims (M = their product rows).
        weight: (N, K) base weight, x's dtype. bias: (N,) or None.
        loras: a sequence of ``(A, B, scale)`` with A (r_i, K), B (N, r_i), scale a float or a 0-d
            tensor (ranks may differ), or a :class:`PackedLoRA` made once per layer.
        gates: None (all 1), (L,) one gate per LoRA, or (batch, L) one per sample where batch =
            x.shape[0] and each sample owns its contiguous rows.
        stats: also return per-row :class:`LoRAStats` (``kl``, ``energy``, ``kl_reverse``, each
            (M, L) fp32) of the ungated deltas d_i = scale_i (x A_i^T) B_i^T against f0 = x W^T + b.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" (CUDA or TRITON_INTERPRET=1) or
            "torch" (the reference: addmm, one shrink, one in-place addmm_).

    Returns:
        y: (..., N) in x's dtype, or ``(y, stats)`` with ``stats=True``.

    Any rank from 1 to 512 per LoRA (ranks may differ); any strides on x, weight, bias, A, B and
    gates (read through their strides; only an x or weight whose last dim is strided is copied once,
    so that the kernels' loads stay coalesced). Non-finite values follow the formula on both
    backends (IEEE: 0 * NaN = NaN, 0 * inf = NaN): a NaN in a LoRA gated to exactly 0 still reaches
    y; a NaN in row m of x only reaches row m. Differentiable on both backends: the Triton op's
    backward gives x, weight, bias, the LoRA factors (through the packing) and the gates their
    gradients; the statistics are not differentiable. Raises ValueError for K = 0 or N = 0, a bare
    ``(A, B, scale)`` triple where a list of them belongs, and mismatched shapes; TypeError for
    unsupported dtypes.
    """
    out = fused_lora_forward(x, weight, bias, loras, gates, stats=stats, backend=backend)
    if not stats:
        return out.y
    return out.y, reduce_lora_stats(out.partials, out.packed.num_loras, backend="triton" if out.u.is_cuda else "torch")


def lora_fixup(
    y: torch.Tensor,
    u: torch.Tensor,
    packed: PackedLoRA,
    delta_gates: torch.Tensor,
    rows_per_sample: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """In place ``y[m] += sum_i delta_gates[sample(m), i] * U_i[m] b_i^T`` (see :mod:`.lora_fixup`).

    Not differentiable (it is the speculative KL path's correction, run without autograd). On the
    Triton backend, tiles whose rows all have zero delta gates are skipped on the device, so
    non-finite U or b values there do not reach y; elsewhere the update follows the formula.

    y: (M, N) (or any (..., N) with M rows) as returned by :func:`fused_lora_forward`; u: (M, L*R) fp32;
    delta_gates: (L,) or (G, L) with G * rows_per_sample = M. Returns y.
    """
    what = "lora_fixup"
    L = packed.num_loras
    if not y.is_contiguous():  # a shape check, not a data-pointer one: traceable by torch.compile
        raise ValueError(f"{what}: y must be contiguous (it is updated in place)")
    y2 = y.view(-1, y.shape[-1])
    if u.shape != (y2.shape[0], packed.a.shape[0]) or y2.shape[1] != packed.out_features:
        raise ValueError(f"{what}: y {tuple(y2.shape)} / u {tuple(u.shape)} do not match the packed LoRAs")
    dg = delta_gates.to(torch.float32).reshape(-1, L).contiguous()
    if y2.shape[0] == 0:  # no rows, nothing to correct (any number of zero-token samples)
        return y
    if dg.shape[0] not in (1, max(1, y2.shape[0] // rows_per_sample)):
        raise ValueError(f"{what}: delta_gates must be ({L},) or (batch, {L}), got {tuple(delta_gates.shape)}")
    if resolve_backend(backend, y.device, what) == "triton":
        _fixup_op(y2, u, packed.b, dg, rows_per_sample, list(packed.ranks))
    else:
        lora_fixup_torch(y2, u, packed.b, dg, rows_per_sample, L)
    return y


def lora_shrink(x: torch.Tensor, loras: Sequence | PackedLoRA, *, backend: str = "auto") -> torch.Tensor:
    """``U = x [A_1; ...; A_L]^T`` (padded blocks) in fp32: (..., K) -> (M, L*R)."""
    check_dtype("x", x, "lora_shrink")
    packed = prepare_loras(loras, x, "lora_shrink")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"lora_shrink: x has {x.shape[-1]} features but A has {packed.in_features}")
    x2 = x.reshape(-1, x.shape[-1])
    if resolve_backend(backend, x.device, "lora_shrink") == "triton":
        from .shrink import lora_shrink_triton

        return lora_shrink_triton(x2 if x2.stride(-1) == 1 else x2.contiguous(), packed.a)
    return lora_shrink_torch(x2, packed.a)


__all__ = [
    "FusedForward",
    "LoRAStats",
    "PackedLoRA",
    "fused_lora_forward",
    "fused_lora_linear",
    "lora_fixup",
    "lora_shrink",
    "reduce_lora_stats",
]
