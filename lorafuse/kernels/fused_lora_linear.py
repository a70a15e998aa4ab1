"""The fused base + multi-LoRA linear: one GEMM whose epilogue adds the gated LoRA expand, the bias
and (optionally) the per-row statistics partials of the KL / energy statistics.

For x (M, K), W (N, K), bias b (N,), a :class:`PackedLoRA` (a: (L*R, K), b_cat: (N, L*R), scales
folded) and per-row gates g (M, L) (a row's gate is its sample's)::

    U   = x a^T                                              (M, L*R) fp32     -- shrink kernel
    f0  = x W^T + b                                          (fp32 accumulator)
    d_i = U[:, iR:(i+1)R] b_cat[:, iR:(i+1)R]^T = s_i (x A_i^T) B_i^T
    y   = f0 + sum_i g[:, i] * d_i                           (M, N) in x's dtype

With ``STATS`` the epilogue also writes, for every row m and N-tile t, the fp32 partials
(see :mod:`lorafuse.kernels.lora_stats` for the merge)::

    m0 = max_j f0_j              l0  = sum_j exp(f0_j - m0)
    per LoRA i, with f_i = f0 + d_i:
    w_i  = sum_j exp(f0_j - m0) d_ij          m_i = max_j f_ij       l_i = sum_j exp(f_ij - m_i)
    wr_i = sum_j exp(f_ij - m_i) d_ij         e_i = sum_j d_ij^2

The statistics use the ungated d_i: they describe what each LoRA *would* do, the gates only what it
does to y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, device_family, dot_precision, lora_chunks, prune_by_family, rank_chunk, tile_configs
from .packing import PackedLoRA

if HAS_TRITON:
    import triton
    import triton.language as tl

BASE_STATS = 2  # m0, l0
LORA_STATS = 5  # w, m, l, wr, e


def num_stat_columns(num_loras: int) -> int:
    """Width of the last axis of the statistics partials: 2 + 5 * num_loras."""
    return BASE_STATS + LORA_STATS * num_loras


def row_gates(gates: torch.Tensor | None, M: int, rows_per_sample: int, num_loras: int, work) -> torch.Tensor | None:
    """Gates (G, L) expanded to one row per token, (M, L), for the torch paths."""
    if gates is None:
        return None
    g = gates.to(work)
    if M == 0:  # zero-token samples: no rows to gate
        return g[:0]
    if g.shape[0] == 1:
        return g.expand(M, num_loras)
    return g.repeat_interleave(rows_per_sample, dim=0)


def fused_lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: PackedLoRA,
    gates: torch.Tensor | None,
    rows_per_sample: int,
) -> torch.Tensor:
    """The plain-torch path (CPU default, reference sequence): one addmm, one shrink over the unpadded
    concatenated A, gates applied to U's columns, one in-place addmm_ expand.

    x (M, K), gates (G, L) fp32 or None. With per-layer gates held on the CPU, LoRAs gated to exactly
    zero are skipped in eager mode (reading a CPU tensor is no device sync), so a K-LoRA layer pays for
    one LoRA, and gates of exactly 1 skip the gate multiply (y += (x A_i^T) (s_i B_i)^T: the same
    products as the general path, whose multiply by 1 is exact); under torch.compile every LoRA runs
    with its gate instead of breaking the graph.
    """
    y = F.linear(x, weight, bias)  # addmm(bias, x, weight^T); x is 2-D here
    if x.shape[0] == 0:
        return y
    a, b, owner = packed.a_compact, packed.b_compact, packed.compact_lora
    host_gates = gates is not None and gates.shape[0] == 1 and gates.device.type == "cpu"
    if host_gates and not torch.compiler.is_compiling():  # .tolist() would break a compiled graph
        values = gates[0].tolist()
        active = [i for i, v in enumerate(values) if v != 0.0]
        if len(active) < len(values) and not packed.finite:
            active = list(range(len(values)))  # 0 * NaN = NaN: a zero gate skips only finite factors
        if not active:
            return y
        if len(active) == 1:  # K-LoRA / EST: only this LoRA's unpadded block
            i = active[0]
            a_t, b_t = packed.compact_blocks_t[i]
            u = x @ a_t
            if values[i] != 1.0:
                u.mul_(gates[0, i].to(u.dtype))
            return y.addmm_(u, b_t)
        if all(v == 1.0 for v in values):  # merge at weight 1: nothing to scale
            return y.addmm_(x @ a.t(), b.t())
    u = x @ a.t()
    if gates is not None:
        coef = gates.to(u.dtype).index_select(1, owner)  # (G, columns)
        if gates.shape[0] == 1:
            u.mul_(coef)
        else:
            u.view(gates.shape[0], rows_per_sample, u.shape[1]).mul_(coef[:, None, :])
    return y.addmm_(u, b.t())


def fused_gemm_expand_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    b_cat: torch.Tensor,
    gates: torch.Tensor | None,
    rows_per_sample: int,
    num_loras: int,
    stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of the GEMM + expand (+ statistics) kernel, same arguments and results.

    x (M, K), weight (N, K), bias (N,) or None, u (M, L*R) fp32, b_cat (N, L*R), gates (G, L) fp32
    or None with G = 1 or M / rows_per_sample. Returns y (M, N) in x's dtype and, with ``stats``,
    the partials (1, M, 2 + 5L) fp32 (one "tile" spanning all of N). With fp64 inputs everything is
    fp64: that is the exact reference the tests compare with.
    """
    M = x.shape[0]
    R = b_cat.shape[1] // num_loras
    g = row_gates(gates, M, rows_per_sample, num_loras, u.dtype)
    if not stats:
        # the fastest plain-torch sequence: one addmm, one in-place addmm_ for all LoRAs
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        ug = u if g is None else u * g.repeat_interleave(R, dim=1)
        return y.addmm_(ug.to(x.dtype), b_cat.t()), None

    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    f0 = x.to(work) @ weight.to(work).t()
    if bias is not None:
        f0 = f0 + bias.to(work)
    m0 = f0.amax(dim=1)
    p0 = torch.exp(f0 - m0[:, None])
    cols = [m0, p0.sum(dim=1)]
    y = f0.clone()
    for i in range(num_loras):
        blk = slice(i * R, (i + 1) * R)
        d = u[:, blk].to(work) @ b_cat[:, blk].to(work).t()
        fi = f0 + d
        mi = fi.amax(dim=1)
        pi = torch.exp(fi - mi[:, None])
        cols += [(p0 * d).sum(dim=1), mi, pi.sum(dim=1), (pi * d).sum(dim=1), (d * d).sum(dim=1)]
        y += d if g is None else g[:, i : i + 1] * d
    return y.to(x.dtype), torch.stack(cols, dim=1)[None].to(work)


if HAS_TRITON:
    # (kwargs, num_warps, num_stages). Two fp32 [BM, BN] tiles are live in the STATS epilogue, so the
    # tables stay at <= 128 x 128 tiles. BLOCK_N is uniform within a family: the host sizes the
    # statistics partials (one slab per N-tile) before the autotuner picks a config.
    _GEMM_TABLE = {
        "hopper": [
            ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
            ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
            ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
            ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
            # half the rows per thread: room for the STATS epilogue's extra fp32 tiles without spills
            ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
        ],
        "ampere": [
            ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
            ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
            ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
            ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 4),
        ],
        "older": [({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 2)],
    }
    _INTERPRET_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}

    @triton.jit
    def _store_stat(part_ptr, col, value, rm, mask_m, stride_pm):
        tl.store(part_ptr + rm * stride_pm + col, value, mask=mask_m)

    @triton.autotune(
        configs=tile_configs(_GEMM_TABLE, _INTERPRET_GEMM),
        key=["M", "N", "K", "NUM_LORAS", "RANK_BLOCK", "RANK_CHUNK", "LORA_CHUNKS", "STATS", "GATED", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": prune_by_family("x_ptr")},
    )
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _fused_lora_linear_kernel(
        x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, gate_ptr, y_ptr, part_ptr,
        M, N, K, rows_per_sample,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
        stride_um, stride_ur, stride_bn, stride_br,
        stride_gs, stride_gl, stride_ym, stride_yn, stride_pt, stride_pm,
        NUM_LORAS: tl.constexpr, RANK_BLOCK: tl.constexpr, RANK_CHUNK: tl.constexpr, LORA_CHUNKS: tl.constexpr,
        HAS_BIAS: tl.constexpr, GATED: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        # grouped ordering: GROUP_M row-tiles share each column panel of W while it is in L2
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pids_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // pids_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % pids_in_group) % group_size_m)
        pid_n = (pid % pids_in_group) // group_size_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < N
        # ragged M/N: wrap indices onto valid rows/columns so loads need no masks; stores are masked
        rm_ld = rm % M
        rn_ld = rn % N

        # ---- base GEMM: acc = x W^T over K
        x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rk[:, None] * stride_wk + rn_ld[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                xt = tl.load(x_ptrs)
                wt = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                xt = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
                wt = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # ---- epilogue: bias, statistics of the base, gated expand of each LoRA
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_ld * stride_bias).to(tl.float32)[None, :]
        if STATS:
            part_ptr += pid_n * stride_pt
            f0 = tl.where(mask_n[None, :], acc, float("-inf"))
            m0 = tl.max(f0, axis=1)
            p0 = tl.exp(f0 - m0[:, None])  # exactly 0 on padded columns
            _store_stat(part_ptr, 0, m0, rm, mask_m, stride_pm)
            _store_stat(part_ptr, 1, tl.sum(p0, axis=1), rm, mask_m, stride_pm)

        # LoRA i owns columns [i*RANK_BLOCK, (i+1)*RANK_BLOCK) of U and b; only its first
        # LORA_CHUNKS[i] slices of RANK_CHUNK columns hold its (16-padded) rank, the rest is skipped
        rc = tl.arange(0, RANK_CHUNK)
        for i in tl.static_range(NUM_LORAS):
            if GATED:
                g = tl.load(gate_ptr + (rm_ld // rows_per_sample) * stride_gs + i * stride_gl)
            if STATS:
                d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c in range(LORA_CHUNKS[i]):  # a loop, not unrolled: one slice live at a time
                cols = i * RANK_BLOCK + c * RANK_CHUNK + rc
                u = tl.load(u_ptr + rm_ld[:, None] * stride_um + cols[None, :] * stride_ur)
                bt = tl.load(b_ptr + cols[:, None] * stride_br + rn_ld[None, :] * stride_bn)
                if STATS:
                    d = tl.dot(u.to(bt.dtype), bt, d, input_precision=DOT_PRECISION)
                else:
                    if GATED:
                        u = u * g[:, None]
                    acc = tl.dot(u.to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)
            if STATS:
                d = tl.where(mask_n[None, :], d, 0.0)
                fi = f0 + d
                mi = tl.max(fi, axis=1)
                pi = tl.exp(fi - mi[:, None])
                col = 2 + 5 * i
                _store_stat(part_ptr, col + 0, tl.sum(p0 * d, axis=1), rm, mask_m, stride_pm)
                _store_stat(part_ptr, col + 1, mi, rm, mask_m, stride_pm)
                _store_stat(part_ptr, col + 2, tl.sum(pi, axis=1), rm, mask_m, stride_pm)
                _store_stat(part_ptr, col + 3, tl.sum(pi * d, axis=1), rm, mask_m, stride_pm)
                _store_stat(part_ptr, col + 4, tl.sum(d * d, axis=1), rm, mask_m, stride_pm)
                if GATED:
                    acc += g[:, None] * d
                else:
                    acc += d

        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_block_n(device: torch.device) -> int:
    """The BLOCK_N every GEMM config for ``device`` uses (it fixes the number of statistics tiles)."""
    if device.type != "cuda":
        return _INTERPRET_GEMM["BLOCK_N"]
    family = device_family(device.index if device.index is not None else torch.cuda.current_device())
    widths = {kw["BLOCK_N"] for kw, _, _ in _GEMM_TABLE.get(family, _GEMM_TABLE["ampere"])}
    assert len(widths) == 1, "BLOCK_N must be uniform within a family"
    return widths.pop()


def launch_fused_gemm_expand(
    x, weight, bias, u, b_cat, gates, y, part, rows_per_sample, ranks, stats, wrap=lambda k: k
) -> None:
    """Launch the GEMM + expand kernel into ``y`` (and ``part`` with ``stats``); no checks.

    ``ranks``: the true rank of each packed LoRA (``b_cat`` has ``len(ranks)`` blocks of equal width), or
    the number of LoRAs (each block then read in full).
    ``part`` must be (ceil(N / gemm_block_n(device)), M, 2 + 5L).
    """
    M, K = x.shape
    N = weight.shape[0]
    if isinstance(ranks, int):  # a LoRA count (older callers): every block read in full
        ranks = (b_cat.shape[1] // ranks,) * ranks
    num_loras = len(ranks)
    R = b_cat.shape[1] // num_loras
    chunk = rank_chunk(ranks, R)
    gate_arg = gates if gates is not None else u
    gs = (gates.stride(0) if gates.shape[0] > 1 else 0, gates.stride(1)) if gates is not None else (0, 0)
    part_arg = part if part is not None else y
    ps = (part.stride(0), part.stride(1)) if part is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    wrap(_fused_lora_linear_kernel)[grid](
        x, weight, bias if bias is not None else weight, u, b_cat, gate_arg, y, part_arg,
        M, N, K, rows_per_sample,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        u.stride(0), u.stride(1), b_cat.stride(0), b_cat.stride(1),
        gs[0], gs[1], y.stride(0), y.stride(1), ps[0], ps[1],
        NUM_LORAS=num_loras, RANK_BLOCK=R, RANK_CHUNK=chunk, LORA_CHUNKS=lora_chunks(ranks, chunk),
        HAS_BIAS=bias is not None, GATED=gates is not None, STATS=stats, DOT_PRECISION=dot_precision(x.dtype),
    )
