"""The LoRA shrink ``U = x a^T`` in fp32, a Triton kernel beside its torch reference.

Shapes: x (M, K) fp16/bf16/fp32, a (R, K) (a :class:`PackedLoRA`'s concatenated down factors),
U (M, R) float32. fp32 accumulation and an fp32 result: a half-precision U loses accuracy in the
expand (Punica's lesson); it is tiny (R <= a few hundred columns).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, dot_precision, next_pow2, prune_by_family, tile_configs

if HAS_TRITON:
    import triton
    import triton.language as tl


def lora_shrink_torch(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Reference: ``U = x a^T`` accumulated and returned in fp32 (fp64 inputs stay fp64)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(work) @ a.to(work).t()


if HAS_TRITON:
    # (kwargs, num_warps, num_stages) per GPU family; BLOCK_R covers the whole (padded) rank width
    # when it is <= 128 so x is read once.
    _SHRINK_TABLE = {
        "hopper": [
            ({"BLOCK_M": 64, "BLOCK_K": 128}, 4, 3),
            ({"BLOCK_M": 32, "BLOCK_K": 256}, 4, 3),
            ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 3),  # fits fp32 with BLOCK_R = 128
        ],
        "ampere": [({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 3), ({"BLOCK_M": 32, "BLOCK_K": 128}, 4, 3)],
        "older": [({"BLOCK_M": 32, "BLOCK_K": 64}, 4, 2)],
    }

    @triton.autotune(
        configs=tile_configs(_SHRINK_TABLE, {"BLOCK_M": 64, "BLOCK_K": 64}),
        key=["M", "K", "R", "BLOCK_R"],
        prune_configs_by={"early_config_prune": prune_by_family("x_ptr")},
    )
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, u_ptr,
        M, K, R,
        stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
        BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        # wrap out-of-range rows/columns onto valid ones: loads need no M/R masks, stores are masked
        rm_ld = rm % M
        rr_ld = rr % R
        x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :] * stride_xk
        a_ptrs = a_ptr + rk[:, None] * stride_ak + rr_ld[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                xt = tl.load(x_ptrs)
                at = tl.load(a_ptrs)
            else:
                k_left = K - k * BLOCK_K
                xt = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
                at = tl.load(a_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        u_ptrs = u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur
        tl.store(u_ptrs, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


def shrink_block_r(R: int) -> int:
    """Rank-axis tile: the whole width up to 128 (x read once), else 128-column slabs."""
    return min(128, next_pow2(R))


def launch_lora_shrink(x: torch.Tensor, a: torch.Tensor, u: torch.Tensor, wrap=lambda k: k) -> None:
    """Launch the shrink kernel writing ``u`` (M, R) fp32; ``wrap`` is ``torch.library.wrap_triton``
    inside a registered op, identity otherwise. No checks: callers validate."""
    M, K = x.shape
    R = a.shape[0]
    block_r = shrink_block_r(R)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))

    wrap(_lora_shrink_kernel)[grid](
        x, a, u, M, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), u.stride(0), u.stride(1),
        BLOCK_R=block_r, DOT_PRECISION=dot_precision(x.dtype),
    )


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Triton: ``U = x a^T`` in fp32. x (M, K), a (R, K) of x's dtype, R a multiple of 16."""
    u = torch.empty(x.shape[0], a.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        launch_lora_shrink(x, a, u)
    return u
