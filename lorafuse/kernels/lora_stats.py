"""Merge the per-(row, N-tile) statistics partials of the fused linear into per-row KL and energy.

Partials: (T, M, 2 + 5L) fp32, T = number of N-tiles, columns ``m0, l0`` then per LoRA i
``w_i, m_i, l_i, wr_i, e_i`` (definitions in :mod:`lorafuse.kernels.fused_lora_linear`).
With ``M0 = max_t m0_t``, ``L0 = sum_t l0_t exp(m0_t - M0)``, ``W_i = sum_t w_it exp(m0_t - M0)``,
``M_i = max_t m_it``, ``L_i = sum_t l_it exp(m_it - M_i)``, ``WR_i = sum_t wr_it exp(m_it - M_i)``::

    kl_i         = KL(p0 || p_i) = (M_i - M0) + log(L_i / L0) - W_i / L0
    kl_reverse_i = KL(p_i || p0) = (M0 - M_i) + log(L0 / L_i) + WR_i / L_i
    energy_i     = ||d_i||^2     = sum_t e_it

where p0 = softmax(f0) and p_i = softmax(f0 + d_i) over the N output channels of a row. Writing the
log-sum-exp difference as (max difference) + log(ratio) never forms LSE itself, so the cancellation
error is ~1e-7 in absolute terms rather than relative to |LSE|. All three outputs are (M, L) fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import HAS_TRITON
from .fused_lora_linear import BASE_STATS, LORA_STATS

if HAS_TRITON:
    import triton
    import triton.language as tl


class LoRAStats(NamedTuple):
    """Per-row statistics of each LoRA's delta d_i = s_i (x A_i^T) B_i^T, each (rows, num_loras) fp32.

    ``kl``: KL(softmax(f0) || softmax(f0 + d_i)) over output channels; ``energy``: ||d_i||^2;
    ``kl_reverse``: KL(softmax(f0 + d_i) || softmax(f0)). Fields are also reachable as
    ``stats["kl"]``.
    """

    kl: torch.Tensor
    energy: torch.Tensor
    kl_reverse: torch.Tensor

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


def reduce_lora_stats_torch(part: torch.Tensor, num_loras: int) -> LoRAStats:
    """Reference merge of the partials (T, M, 2 + 5L) into :class:`LoRAStats` (fp64 stays fp64)."""
    m0, l0 = part[..., 0], part[..., 1]
    M0 = m0.amax(dim=0)
    s0 = torch.exp(m0 - M0)
    L0 = (l0 * s0).sum(dim=0)
    kl, klr, energy = [], [], []
    for i in range(num_loras):
        w, m, l, wr, e = (part[..., BASE_STATS + LORA_STATS * i + c] for c in range(LORA_STATS))
        Mi = m.amax(dim=0)
        si = torch.exp(m - Mi)
        Li = (l * si).sum(dim=0)
        W = (w * s0).sum(dim=0)
        WR = (wr * si).sum(dim=0)
        kl.append((Mi - M0) + torch.log(Li / L0) - W / L0)
        klr.append((M0 - Mi) + torch.log(L0 / Li) + WR / Li)
        energy.append(e.sum(dim=0))
    return LoRAStats(torch.stack(kl, 1), torch.stack(energy, 1), torch.stack(klr, 1))


if HAS_TRITON:

    @triton.jit
    def _reduce_lora_stats_kernel(
        part_ptr, kl_ptr, klr_ptr, en_ptr,
        M, T, stride_pt, stride_pm, stride_om,
        NUM_LORAS: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = rm < M
        rows = part_ptr + rm * stride_pm
        # pass 1: the maxima over tiles (tile 0 seeds them: no -inf - -inf)
        M0 = tl.load(rows, mask=mask, other=0.0)
        for t in range(1, T):
            M0 = tl.maximum(M0, tl.load(rows + t * stride_pt, mask=mask, other=0.0))
        # pass 2: rescaled sums
        L0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(0, T):
            L0 += tl.load(rows + t * stride_pt + 1, mask=mask, other=1.0) * tl.exp(
                tl.load(rows + t * stride_pt, mask=mask, other=0.0) - M0
            )
        for i in tl.static_range(NUM_LORAS):
            col = 2 + 5 * i
            Mi = tl.load(rows + col + 1, mask=mask, other=0.0)
            for t in range(1, T):
                Mi = tl.maximum(Mi, tl.load(rows + t * stride_pt + col + 1, mask=mask, other=0.0))
            W = tl.zeros((BLOCK_M,), dtype=tl.float32)
            Li = tl.zeros((BLOCK_M,), dtype=tl.float32)
            WR = tl.zeros((BLOCK_M,), dtype=tl.float32)
            E = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for t in range(0, T):
                tile = rows + t * stride_pt
                s0 = tl.exp(tl.load(tile, mask=mask, other=0.0) - M0)
                si = tl.exp(tl.load(tile + col + 1, mask=mask, other=0.0) - Mi)
                W += tl.load(tile + col, mask=mask, other=0.0) * s0
                Li += tl.load(tile + col + 2, mask=mask, other=1.0) * si
                WR += tl.load(tile + col + 3, mask=mask, other=0.0) * si
                E += tl.load(tile + col + 4, mask=mask, other=0.0)
            out = rm * stride_om + i
            tl.store(kl_ptr + out, (Mi - M0) + tl.log(Li / L0) - W / L0, mask=mask)
            tl.store(klr_ptr + out, (M0 - Mi) + tl.log(L0 / Li) + WR / Li, mask=mask)
            tl.store(en_ptr + out, E, mask=mask)


REDUCE_BLOCK_M = 128


def launch_reduce_lora_stats(part, kl, klr, energy, num_loras, wrap=lambda k: k) -> None:
    T, M, _ = part.shape
    wrap(_reduce_lora_stats_kernel)[(triton.cdiv(M, REDUCE_BLOCK_M),)](
        part, kl, klr, energy, M, T, part.stride(0), part.stride(1), kl.stride(0),
        NUM_LORAS=num_loras, BLOCK_M=REDUCE_BLOCK_M,
    )


def reduce_lora_stats_triton(part: torch.Tensor, num_loras: int) -> LoRAStats:
    """Triton merge of contiguous fp32 partials (T, M, 2 + 5L) into :class:`LoRAStats`."""
    M = part.shape[1]
    kl, klr, energy = (torch.empty(M, num_loras, dtype=torch.float32, device=part.device) for _ in range(3))
    if M:
        launch_reduce_lora_stats(part, kl, klr, energy, num_loras)
    return LoRAStats(kl, energy, klr)


def reduce_lora_stats(part: torch.Tensor, num_loras: int, *, backend: str = "auto") -> LoRAStats:
    """Per-row ``kl``, ``energy`` and ``kl_reverse`` (each (M, L) fp32) from the partials."""
    from ._common import resolve_backend

    if part.dim() != 3 or part.shape[2] != BASE_STATS + LORA_STATS * num_loras:
        raise ValueError(
            f"reduce_lora_stats: partials must be (tiles, rows, {BASE_STATS + LORA_STATS * num_loras}), "
            f"got {tuple(part.shape)}"
        )
    if resolve_backend(backend, part.device, "reduce_lora_stats") == "triton" and part.dtype == torch.float32:
        return reduce_lora_stats_triton(part.contiguous(), num_loras)
    return reduce_lora_stats_torch(part, num_loras)
