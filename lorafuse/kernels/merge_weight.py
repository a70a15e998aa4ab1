"""Merged LoRA weights: ``W_eff = W + sum_i g_i (s_i B_i) A_i``, a Triton kernel beside its torch
reference, plus a grouped variant that rebuilds, in one launch, the layers whose gates changed.

For one linear layer with base weight W (N, K) and a :class:`PackedLoRA` ``p`` (``p.a``: (L R, K),
``p.b``: (N, L R) with the scales folded in, LoRA i owning rank columns [i R, (i + 1) R))::

    W_eff[n, k] = W[n, k] + sum_i g_i sum_{r in block i} b[n, r] a[r, k]

accumulated in fp32 (fp64 for fp64 weights) and rounded once to the output's dtype. Gates g (L,)
are fp32 and may live on the device. ``out`` may be ``W`` itself (in place: every tile reads its W
tile before it writes it, and no tile reads another's).

A static fusion method (K-LoRA, EST, a linear merge) fixes g for a whole denoiser call, so a patched
layer can run one plain ``F.linear`` on ``W_eff`` and rebuild it only when g changes (at most a
couple of times per layer per image). :func:`merge_flipped_weights` does that rebuild for many
layers at once without reading the gates on the host: per layer l, when the gates row ``g[l]``
differs from ``applied[l]`` (the gates ``dst_l`` was last built with) and the layer is enabled,

    dst_l = src_l + sum_i g[l, i] (s_i B_i) A_i

then ``applied <- g``. On the Triton path it is one launch over (tile, layer) that exits early for
unchanged layers, reading each layer's pointers and sizes from a :class:`MergeTable` (int64 device
table); the torch reference reads the flip mask on the host (free on a CPU, one sync on CUDA).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._common import HAS_TRITON, check_dtype, resolve_backend
from .packing import PackedLoRA

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["MergeTable", "merge_flipped_weights", "merge_lora_weight"]

_WHAT = "merge_lora_weight"
# tile of the output weight; the rank axis is walked in slices of 16 (the smallest tl.dot K)
MERGE_BLOCK_N, MERGE_BLOCK_K, RANK_SLICE = 64, 64, 16


# ------------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ------------------------------------------------------------------------------------------------
def merge_lora_weight_torch(weight: torch.Tensor, packed: PackedLoRA, gates: torch.Tensor,
                            out: torch.Tensor) -> torch.Tensor:
    """Reference: ``out = W + (b diag(g per rank column)) a`` in fp32 (fp64 for fp64), one rounding.
    Uses the unpadded factors (padding is pure waste on a CPU); one ``addmm`` (W added inside the GEMM,
    written straight into ``out`` when it has the working dtype: a flip on the CPU is three ops)."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    bg = packed.b_compact.to(work) * gates.to(work).index_select(0, packed.compact_lora)
    a = packed.a_compact.to(work)
    if out.dtype != work or weight.dtype != work:
        out.copy_(torch.addmm(weight.to(work), bg, a))
    elif out is weight:
        out.addmm_(bg, a)
    else:
        torch.addmm(weight, bg, a, out=out)
    return out


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _merge_tile(
        w_ptrs, out_ptrs, a_ptr, b_ptr, g_ptr,              # tensors (w/out tile pointers built by the caller)
        rn, rk, N, K, R,                                    # tile rows/cols, sizes; R = one LoRA's rank block
        stride_ar, stride_ak, stride_bn, stride_br, stride_gl,
        NUM_LORAS: tl.constexpr, RANK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One (BLOCK_N, BLOCK_K) tile of W_eff: the W tile plus each LoRA's gated rank slices."""
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        acc = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        rs = tl.arange(0, RANK_SLICE)
        for i in tl.static_range(NUM_LORAS):
            g = tl.load(g_ptr + i * stride_gl)
            for r0 in range(0, R, RANK_SLICE):
                rr = i * R + r0 + rs
                bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                             mask=rn[:, None] < N, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                             mask=rk[None, :] < K, other=0.0).to(tl.float32)
                acc = tl.dot(bt * g, at, acc, input_precision=DOT_PRECISION)
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_lora_weight_kernel(
        w_ptr, a_ptr, b_ptr, g_ptr, out_ptr,                       # tensors
        N, K, R,                                                   # sizes (R: rank block per LoRA)
        stride_wn, stride_wk, stride_on, stride_ok,                # strides: W and out (row, col)
        stride_ar, stride_ak, stride_bn, stride_br, stride_gl,     # strides: a, b, gates
        NUM_LORAS: tl.constexpr, RANK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        _merge_tile(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                    out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok,
                    a_ptr, b_ptr, g_ptr, rn, rk, N, K, R,
                    stride_ar, stride_ak, stride_bn, stride_br, stride_gl,
                    NUM_LORAS, RANK_SLICE, DOT_PRECISION)

    @triton.jit
    def _merge_flipped_kernel(
        table_ptr, gates_ptr, applied_ptr,                  # int64 (layers, FIELDS) table; fp32 (layers, L) x2
        stride_table, stride_gates, stride_applied,
        W_DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr,  # element types behind the table's pointers
        NUM_LORAS: tl.constexpr, RANK_SLICE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        layer = tl.program_id(1)
        row = table_ptr + layer * stride_table
        enabled = tl.load(row + 7)
        changed = 0
        for i in tl.static_range(NUM_LORAS):
            g = tl.load(gates_ptr + layer * stride_gates + i)
            changed += (g != tl.load(applied_ptr + layer * stride_applied + i)).to(tl.int32)
        if (enabled == 0) | (changed == 0):
            return
        N = tl.load(row + 4).to(tl.int32)
        K = tl.load(row + 5).to(tl.int32)
        R = tl.load(row + 6).to(tl.int32)
        tiles_k = tl.cdiv(K, BLOCK_K)
        tile_n = tl.program_id(0) // tiles_k
        if tile_n * BLOCK_N >= N:
            return
        rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        src = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
        dst = tl.load(row + 1).to(tl.pointer_type(W_DTYPE))
        a = tl.load(row + 2).to(tl.pointer_type(FACTOR_DTYPE))
        b = tl.load(row + 3).to(tl.pointer_type(FACTOR_DTYPE))
        offs = rn[:, None] * K + rk[None, :]  # contiguous (N, K) weights, contiguous packed factors
        _merge_tile(src + offs, dst + offs, a, b, gates_ptr + layer * stride_gates, rn, rk, N, K, R,
                    K, 1, NUM_LORAS * R, 1, 1, NUM_LORAS, RANK_SLICE, DOT_PRECISION)


def merge_lora_weight_triton(weight: torch.Tensor, packed: PackedLoRA, gates: torch.Tensor,
                             out: torch.Tensor) -> torch.Tensor:
    """Triton: the same as :func:`merge_lora_weight_torch` (fp32 tiles, exact fp32 dots)."""
    N, K = weight.shape
    grid = (triton.cdiv(N, MERGE_BLOCK_N), triton.cdiv(K, MERGE_BLOCK_K))
    _merge_lora_weight_kernel[grid](
        weight, packed.a, packed.b, gates, out,
        N, K, packed.rank_block,
        weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        packed.a.stride(0), packed.a.stride(1), packed.b.stride(0), packed.b.stride(1), gates.stride(0),
        NUM_LORAS=packed.num_loras, RANK_SLICE=RANK_SLICE, DOT_PRECISION="ieee",
        BLOCK_N=MERGE_BLOCK_N, BLOCK_K=MERGE_BLOCK_K, num_warps=4, num_stages=1,  # as compile_check builds it
    )
    return out


def _check_gates_row(gates, num_loras: int, device: torch.device, what: str) -> torch.Tensor:
    if not isinstance(gates, torch.Tensor):
        if isinstance(gates, (list, tuple)) and len(gates) == num_loras:
            return torch.tensor([float(g) for g in gates], dtype=torch.float32, device=device)
        raise TypeError(f"{what}: gates must be a ({num_loras},) tensor or a sequence of {num_loras} floats")
    if gates.shape != (num_loras,):
        raise ValueError(f"{what}: gates must have shape ({num_loras},), got {tuple(gates.shape)}")
    if gates.device != device:
        raise ValueError(f"{what}: gates are on {gates.device} but the weight is on {device}")
    return gates.to(torch.float32)


def merge_lora_weight(
    weight: torch.Tensor,
    loras: PackedLoRA | Sequence,
    gates: torch.Tensor | Sequence[float],
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``W_eff = W + sum_i g_i s_i B_i A_i`` (fp32 accumulation, one rounding to ``out``'s dtype).

    Args:
        weight: (N, K) fp16/bf16/fp32 (fp64 on the torch backend).
        loras: a :class:`PackedLoRA` of (N, K) LoRAs (pack it in fp32 for the most exact merge) or
            raw ``(A, B, scale)`` triples (packed here in fp32).
        gates: (L,) fp32 tensor on the weight's device (read on the device, never on the host) or L
            floats.
        out: (N, K) of any supported dtype on the same device (default: a new tensor of the
            weight's dtype); may be ``weight`` itself.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns ``out``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{_WHAT}: weight must be a 2-D (N, K) tensor")
    if weight.dtype != torch.float64:
        check_dtype("weight", weight, _WHAT)
    packed = loras if isinstance(loras, PackedLoRA) else PackedLoRA.pack(
        loras, dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32, device=weight.device)
    if (packed.out_features, packed.in_features) != tuple(weight.shape):
        raise ValueError(f"{_WHAT}: the LoRAs target ({packed.out_features} x {packed.in_features}) but the weight "
                         f"is {tuple(weight.shape)}")
    if packed.device != weight.device:
        raise ValueError(f"{_WHAT}: the packed LoRAs are on {packed.device} but the weight is on {weight.device}")
    g = _check_gates_row(gates, packed.num_loras, weight.device, _WHAT)
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    elif out.shape != weight.shape or out.device != weight.device:
        raise ValueError(f"{_WHAT}: out must be {tuple(weight.shape)} on {weight.device}, got "
                         f"{tuple(out.shape)} on {out.device}")
    if resolve_backend(backend, weight.device, _WHAT) == "torch" or torch.float64 in (weight.dtype, packed.dtype):
        return merge_lora_weight_torch(weight, packed, g, out)
    check_dtype("out", out, _WHAT)
    return merge_lora_weight_triton(weight, packed, g, out)


# ------------------------------------------------------------------------------------------------
# grouped: rebuild the layers whose gates changed
# ------------------------------------------------------------------------------------------------
_TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MergeTable:
    """The layers :func:`merge_flipped_weights` may rebuild, as an int64 device table (one row per
    layer: src, dst, a, b pointers, N, K, R, enabled) plus the tensors behind the pointers, held
    here so that no pointer in the table can dangle (a moved weight leaves a stale but live copy;
    callers detect the move and :meth:`set` the row again).

    All rows share the weights' dtype and the factors' dtype; weights and factors are contiguous.
    """

    FIELDS = 8

    def __init__(self, num_layers: int, num_loras: int, device: torch.device | str):
        self.device = torch.device(device)
        self.num_loras = num_loras
        self.table = torch.zeros(num_layers, self.FIELDS, dtype=torch.int64, device=self.device)
        self.rows: list[tuple | None] = [None] * num_layers  # (src, dst, packed) per enabled layer
        self.weight_dtype: torch.dtype | None = None
        self.factor_dtype: torch.dtype | None = None
        self.max_tiles = 0

    def __len__(self) -> int:
        return len(self.rows)

    def accepts(self, src: torch.Tensor, dst: torch.Tensor, packed: PackedLoRA) -> bool:
        """Whether (src, dst, packed) fits this table (device, dtypes, contiguity, LoRA count)."""
        return (
            src.device == dst.device == packed.device == self.device
            and src.dtype == dst.dtype == (self.weight_dtype or src.dtype)  # one dtype per table
            and packed.dtype == (self.factor_dtype or packed.dtype)
            and src.dtype in _TABLE_DTYPES and packed.dtype in _TABLE_DTYPES
            and src.is_contiguous() and dst.is_contiguous() and packed.num_loras == self.num_loras
            and packed.a.is_contiguous() and packed.b.is_contiguous()
            and src.shape == dst.shape == (packed.out_features, packed.in_features)
        )

    def set(self, layer: int, src: torch.Tensor, dst: torch.Tensor, packed: PackedLoRA) -> None:
        """Point row ``layer`` at (src, dst, packed) and enable it (one small host-to-device copy)."""
        if not self.accepts(src, dst, packed):
            raise ValueError(f"MergeTable: layer {layer}: src/dst/factors do not fit the table "
                             f"(device {self.device}, weights {self.weight_dtype}, factors {self.factor_dtype})")
        self.weight_dtype, self.factor_dtype = src.dtype, packed.dtype
        N, K = src.shape
        self.rows[layer] = (src, dst, packed)
        row = [src.data_ptr(), dst.data_ptr(), packed.a.data_ptr(), packed.b.data_ptr(), N, K, packed.rank_block, 1]
        self.table[layer].copy_(torch.tensor(row, dtype=torch.int64))
        self.max_tiles = max(self.max_tiles, -(-N // MERGE_BLOCK_N) * -(-K // MERGE_BLOCK_K))

    def disable(self, layer: int) -> None:
        """Leave row ``layer`` out of later merges (the layer runs another path)."""
        if self.rows[layer] is not None:
            self.rows[layer] = None
            self.table[layer, 7] = 0


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def merge_flipped_weights(table: MergeTable, gates: torch.Tensor, applied: torch.Tensor, *,
                          backend: str = "auto") -> None:
    """For every enabled layer l whose ``gates[l]`` differs from ``applied[l]``: ``dst_l = src_l +
    sum_i gates[l, i] s_i B_i A_i``; then ``applied <- gates``. gates, applied: (layers, L) fp32 on
    the table's device. Triton: one launch plus one copy, no host read; torch: reads the flip mask."""
    what = "merge_flipped_weights"
    shape = (len(table), table.num_loras)
    for name, t in (("gates", gates), ("applied", applied)):
        if t.shape != shape or t.dtype != torch.float32 or t.device != table.device:
            raise ValueError(f"{what}: {name} must be {shape} float32 on {table.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if resolve_backend(backend, table.device, what) == "triton" and table.weight_dtype is not None:
        if table.max_tiles:
            _merge_flipped_kernel[(table.max_tiles, len(table))](
                table.table, gates, applied, table.table.stride(0), gates.stride(0), applied.stride(0),
                W_DTYPE=_tl_dtype(table.weight_dtype), FACTOR_DTYPE=_tl_dtype(table.factor_dtype),
                NUM_LORAS=table.num_loras, RANK_SLICE=RANK_SLICE, DOT_PRECISION="ieee",
                BLOCK_N=MERGE_BLOCK_N, BLOCK_K=MERGE_BLOCK_K, num_warps=4, num_stages=1,
            )
    else:
        flipped = (gates != applied).any(dim=1).tolist()
        for layer, (row, flip) in enumerate(zip(table.rows, flipped)):
            if row is not None and flip:
                src, dst, packed = row
                merge_lora_weight_torch(src, packed, gates[layer], dst)
    applied.copy_(gates)
