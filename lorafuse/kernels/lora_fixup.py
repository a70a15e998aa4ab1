"""Low-rank correction of a fused linear's output after its gates changed, in place:

    y[m] += sum_i dg[sample(m), i] * U[m, iR:(i+1)R] b_cat[:, iR:(i+1)R]^T

y (M, N) in the activation dtype, U (M, L*R) fp32 from the shrink, b_cat (N, L*R) scale-folded,
dg (G, L) fp32 with G = 1 or M / rows_per_sample (``g_new - g_old``). This is what turns the
speculative KL path (run with the previous step's gates, decide, correct) into the exact result.
A program whose rows all have dg == 0 skips its loads and stores on the device: no host sync, and
next to nothing runs when no decision flipped.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, dot_precision, lora_chunks, rank_chunk
from .fused_lora_linear import row_gates

if HAS_TRITON:
    import triton
    import triton.language as tl


def lora_fixup_torch(y, u, b_cat, delta_gates, rows_per_sample: int, num_loras: int) -> torch.Tensor:
    """Reference: the same in-place update of ``y`` (returned), skipping nothing."""
    R = b_cat.shape[1] // num_loras
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    g = row_gates(delta_gates, y.shape[0], rows_per_sample, num_loras, work)
    upd = (u.to(work) * g.repeat_interleave(R, dim=1)) @ b_cat.to(work).t()
    y.copy_((y.to(work) + upd).to(y.dtype))
    return y


if HAS_TRITON:

    @triton.jit
    def _lora_fixup_kernel(
        y_ptr, u_ptr, b_ptr, dg_ptr,
        M, N, rows_per_sample,
        stride_ym, stride_yn, stride_um, stride_ur, stride_bn, stride_br, stride_gs, stride_gl,
        NUM_LORAS: tl.constexpr, RANK_BLOCK: tl.constexpr, RANK_CHUNK: tl.constexpr, LORA_CHUNKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_ld = rm % M
        rn_ld = rn % N
        g_ptrs = dg_ptr + (rm_ld // rows_per_sample) * stride_gs
        changed = 0.0
        for i in tl.static_range(NUM_LORAS):
            changed += tl.sum(tl.abs(tl.load(g_ptrs + i * stride_gl)), axis=0)
        if changed != 0.0:  # device-side early exit: nothing flipped for these rows
            rc = tl.arange(0, RANK_CHUNK)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(NUM_LORAS):
                g = tl.load(g_ptrs + i * stride_gl)
                for c in range(LORA_CHUNKS[i]):  # LoRA i's rank slices, padding skipped (a loop, not unrolled)
                    cols = i * RANK_BLOCK + c * RANK_CHUNK + rc
                    u = tl.load(u_ptr + rm_ld[:, None] * stride_um + cols[None, :] * stride_ur)
                    bt = tl.load(b_ptr + cols[:, None] * stride_br + rn_ld[None, :] * stride_bn)
                    acc = tl.dot((u * g[:, None]).to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


FIXUP_BLOCK_M = 64
FIXUP_BLOCK_N = 64


def launch_lora_fixup(y, u, b_cat, delta_gates, rows_per_sample, ranks, wrap=lambda k: k) -> None:
    """Launch the fix-up into ``y`` (M, N) in place; ``ranks`` the true rank of each packed LoRA. No checks."""
    M, N = y.shape
    if isinstance(ranks, int):  # a LoRA count (older callers): every block read in full
        ranks = (b_cat.shape[1] // ranks,) * ranks
    R = b_cat.shape[1] // len(ranks)
    chunk = rank_chunk(ranks, R)
    grid = (triton.cdiv(M, FIXUP_BLOCK_M), triton.cdiv(N, FIXUP_BLOCK_N))
    wrap(_lora_fixup_kernel)[grid](
        y, u, b_cat, delta_gates, M, N, rows_per_sample,
        y.stride(0), y.stride(1), u.stride(0), u.stride(1), b_cat.stride(0), b_cat.stride(1),
        delta_gates.stride(0) if delta_gates.shape[0] > 1 else 0, delta_gates.stride(1),
        NUM_LORAS=len(ranks), RANK_BLOCK=R, RANK_CHUNK=chunk, LORA_CHUNKS=lora_chunks(ranks, chunk),
        DOT_PRECISION=dot_precision(y.dtype), BLOCK_M=FIXUP_BLOCK_M, BLOCK_N=FIXUP_BLOCK_N,
    )


def lora_fixup_triton(y, u, b_cat, delta_gates, rows_per_sample: int, ranks) -> torch.Tensor:
    if y.shape[0]:
        launch_lora_fixup(y, u, b_cat, delta_gates, rows_per_sample, ranks)
    return y
