"""Compile every kernel variant for real GPU targets without a GPU (PTX + cubin through ptxas).

The Triton interpreter accepts programs a GPU compiler rejects (``tl.dot`` with K < 16, dtype mixes,
shared-memory overflows), so CI compiles each kernel for sm_80 and sm_90 as well::

    python -m lorafuse.kernels.compile_check --arch 80 90

Run it without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction`` objects). Prints one
line per variant and exits non-zero when any variant fails.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _jit(kernel):
    """Unwrap ``@autotune`` / ``@heuristics`` down to the JITFunction."""
    while not hasattr(kernel, "arg_names") or hasattr(kernel, "configs") or hasattr(kernel, "values"):
        kernel = kernel.fn
    return kernel


def _compile(kernel, ptr_types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
             unit: tuple = (), aligned: tuple = ()):
    """Compile like the JIT does for contiguous tensors at real shapes: pointers 16-byte aligned,
    ``aligned`` integers divisible by 16 and ``unit`` strides specialised to 1. Without these hints
    Triton cannot vectorise or pipeline the loads, and the shared-memory report is meaningless.
    ``ptr_types`` maps pointer arguments to "*fp16" etc. and may also give scalar types ("fp32")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(kernel)
    constexprs = dict(constexprs, **{name: 1 for name in unit})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = ptr_types.get(name, "i32")
        if signature[name].startswith("*") or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def _resources(compiled) -> str:
    """'REG:n STACK:b' from the cubin via the cuobjdump Triton ships (spills show up as STACK)."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in compiled.asm or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = [w for line in out.splitlines() for w in line.split() if w.startswith(("REG:", "STACK:"))]
    return " ".join(fields)


# the most shared memory one block may use (opt-in maximum), by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


#: per-LoRA rank pairs, one per rank class of the expand kernels: the rank-slice width (16, 32 or 64
#: columns, see ``_common.rank_chunk``) times the number of slices, unrolled at compile time. (16, 16)
#: and (64, 64) are compiled in every dtype below; the others add 32-wide slices, several slices, unequal
#: ranks (LoRA 0 reads one slice of its 208-wide block) and the largest supported rank, 512. The
#: statistics epilogue is compiled for half of them (it only adds a second accumulator to the slices).
RANK_CLASSES = ((32, 32, False), (48, 48, False), (96, 96, True), (4, 200, True), (512, 512, False),
                (512, 512, True))


def _rank_layout(ranks) -> tuple[int, int, tuple[int, ...]]:
    """(RANK_BLOCK, RANK_CHUNK, LORA_CHUNKS) the launchers pass for LoRAs of these ranks."""
    from ._common import lora_chunks, padded_rank, rank_chunk

    R = max(padded_rank(r) for r in ranks)
    chunk = rank_chunk(ranks, R)
    return R, chunk, lora_chunks(ranks, chunk)


def _fused_variants(family: str):
    from .fused_lora_linear import _GEMM_TABLE, _fused_lora_linear_kernel

    gemm = [(w, s, kw) for kw, w, s in _GEMM_TABLE[family]]
    unit = ("stride_xk", "stride_wk", "stride_bias", "stride_ur", "stride_br", "stride_gl", "stride_yn")
    aligned = ("M", "N", "K", "stride_xm", "stride_wn", "stride_um", "stride_bn", "stride_ym")
    # every dtype on the small rank layouts with each switch set; then each rank class in fp16
    flag_sets = [(dt, ranks, bias, gated, stats) for dt in ("fp16", "bf16", "fp32") for ranks, bias, gated, stats in (
        ((16, 16), True, True, False), ((64, 64), True, True, True), ((16,), False, False, True))]
    flag_sets += [("fp16", (r0, r1), True, True, stats) for r0, r1, stats in RANK_CLASSES]
    for dt, ranks, bias, gated, stats in flag_sets:
        R, chunk, chunks = _rank_layout(ranks)
        ptrs = dict(x_ptr=_TY[dt], w_ptr=_TY[dt], bias_ptr=_TY[dt], u_ptr="*fp32", b_ptr=_TY[dt], gate_ptr="*fp32",
                    y_ptr=_TY[dt], part_ptr="*fp32")
        const = dict(NUM_LORAS=len(ranks), RANK_BLOCK=R, RANK_CHUNK=chunk, LORA_CHUNKS=chunks, HAS_BIAS=bias,
                     GATED=gated, STATS=stats, DOT_PRECISION="tf32", EVEN_K=False)
        yield (f"fused_lora_linear {dt} ranks={'-'.join(map(str, ranks))} (R={R} slices {chunk}x{chunks}) "
               f"bias={bias} gated={gated} stats={stats}", _fused_lora_linear_kernel, ptrs, const, gemm, (unit, aligned))


def _shrink_variants(family: str):
    from .shrink import _SHRINK_TABLE, _lora_shrink_kernel

    shrink = [(w, s, kw) for kw, w, s in _SHRINK_TABLE[family]]
    # BLOCK_R = min(128, next_pow2(L*R)): these four widths cover every total rank
    for dt, block_r in [(dt, 16) for dt in ("fp16", "bf16", "fp32")] + [("fp16", 32), ("fp16", 64)] + [
            (dt, 128) for dt in ("fp16", "bf16", "fp32")]:
        yield (f"lora_shrink {dt} BLOCK_R={block_r}", _lora_shrink_kernel,
               dict(x_ptr=_TY[dt], a_ptr=_TY[dt], u_ptr="*fp32"),
               dict(BLOCK_R=block_r, DOT_PRECISION="tf32", EVEN_K=False), shrink,
               (("stride_xk", "stride_ak", "stride_ur"), ("M", "K", "R", "stride_xm", "stride_ar", "stride_um")))


def _fixup_variants(family: str):
    from .lora_fixup import FIXUP_BLOCK_M, FIXUP_BLOCK_N, _lora_fixup_kernel

    cases = [(dt, (16, 16)) for dt in ("fp16", "bf16", "fp32")] + [("fp16", (96, 96)), ("fp16", (4, 200))]
    for dt, ranks in cases:
        R, chunk, chunks = _rank_layout(ranks)
        yield (f"lora_fixup {dt} ranks={'-'.join(map(str, ranks))} (R={R} slices {chunk}x{chunks})", _lora_fixup_kernel,
               dict(y_ptr=_TY[dt], u_ptr="*fp32", b_ptr=_TY[dt], dg_ptr="*fp32"),
               dict(NUM_LORAS=len(ranks), RANK_BLOCK=R, RANK_CHUNK=chunk, LORA_CHUNKS=chunks, DOT_PRECISION="tf32",
                    BLOCK_M=FIXUP_BLOCK_M, BLOCK_N=FIXUP_BLOCK_N),
               [(4, 2, {})],
               (("stride_yn", "stride_ur", "stride_br", "stride_gl"), ("M", "N", "stride_ym", "stride_um", "stride_bn")))


def _delta_variants(family: str):
    from .delta_stats import BLOCK_M as DELTA_BLOCK_M, BLOCK_N as DELTA_BLOCK_N, RANK_BLOCK as DELTA_RANK_BLOCK
    from .delta_stats import _delta_abs_kernel

    # the rank is a runtime loop bound (16-wide masked slices): one variant covers every rank
    for dt, store_abs in itertools.product(("fp16", "bf16", "fp32"), (True, False)):
        yield (f"delta_abs {dt} store_abs={store_abs} (any rank)", _delta_abs_kernel,
               dict(a_ptr=_TY[dt], b_ptr=_TY[dt], out_ptr="*fp32", part_ptr="*fp32", scale="fp32"),
               dict(RANK_BLOCK=DELTA_RANK_BLOCK, BLOCK_M=DELTA_BLOCK_M, BLOCK_N=DELTA_BLOCK_N, STORE_ABS=store_abs,
                    DOT_PRECISION="ieee"),
               [(4, 3, {})],  # the launch's defaults
               (("stride_ak", "stride_br", "stride_ok"), ("row0", "K", "stride_ar", "stride_om")))


def _kl_decide_variants(family: str):
    from .kl_decide import DECIDE_BLOCK_G, DECIDE_BLOCK_M, _kl_decide_kernel

    for forward, batch, tie_subject in itertools.product((True, False), repeat=3):
        yield (f"kl_decide forward={forward} batch={batch} tie_subject={tie_subject}", _kl_decide_kernel,
               dict(part_ptr="*fp32", gate_ptr="*fp32", new_ptr="*fp32", div_ptr="*fp32", delta_ptr="*fp32"),
               dict(FORWARD=forward, BATCH=batch, TIE_SUBJECT=tie_subject, BLOCK_M=DECIDE_BLOCK_M,
                    BLOCK_G=DECIDE_BLOCK_G),
               [(4, 1, {})], (("stride_gl",), ("stride_pt", "stride_pm")))


def _reduce_variants(family: str):
    from .lora_stats import REDUCE_BLOCK_M, _reduce_lora_stats_kernel

    yield ("reduce_lora_stats", _reduce_lora_stats_kernel,
           dict(part_ptr="*fp32", kl_ptr="*fp32", klr_ptr="*fp32", en_ptr="*fp32"),
           dict(NUM_LORAS=2, BLOCK_M=REDUCE_BLOCK_M), [(4, 1, {})], ((), ("M",)))


def _merge_variants(family: str):
    from .merge_weight import (MERGE_BLOCK_K, MERGE_BLOCK_N, RANK_SLICE, _merge_flipped_kernel,
                               _merge_lora_weight_kernel, _tl_dtype)

    # the rank is a runtime loop bound (16-wide slices): one variant per dtype covers every rank
    for dt in ("fp16", "bf16", "fp32"):
        yield (f"merge_lora_weight {dt}", _merge_lora_weight_kernel,
               dict(w_ptr=_TY[dt], a_ptr="*fp32", b_ptr="*fp32", g_ptr="*fp32", out_ptr=_TY[dt]),
               dict(NUM_LORAS=2, RANK_SLICE=RANK_SLICE, DOT_PRECISION="ieee", BLOCK_N=MERGE_BLOCK_N,
                    BLOCK_K=MERGE_BLOCK_K),
               [(4, 1, {})],
               (("stride_wk", "stride_ok", "stride_ak", "stride_br", "stride_gl"),
                ("N", "K", "R", "stride_wn", "stride_on", "stride_ar", "stride_bn")))
        yield (f"merge_flipped_weights {dt}", _merge_flipped_kernel,
               dict(table_ptr="*i64", gates_ptr="*fp32", applied_ptr="*fp32"),
               dict(W_DTYPE=_tl_dtype(getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt])),
                    FACTOR_DTYPE=_tl_dtype(torch.float32), NUM_LORAS=2, RANK_SLICE=RANK_SLICE, DOT_PRECISION="ieee",
                    BLOCK_N=MERGE_BLOCK_N, BLOCK_K=MERGE_BLOCK_K),
               [(4, 1, {})],
               ((), ("stride_table", "stride_gates", "stride_applied")))


#: one generator per kernel file, each ``fn(family) -> variants``; a new kernel adds one entry here
REGISTRY = [_fused_variants, _shrink_variants, _fixup_variants, _delta_variants, _kl_decide_variants,
            _reduce_variants, _merge_variants]


def variants(family: str):
    """(label, kernel, ptr types, constexprs, [(warps, stages, tile kwargs), ...], (unit, aligned))
    per kernel variant, from every entry of :data:`REGISTRY`.

    Tiled kernels list every config of ``family``'s table: the autotuner skips configs that run out of
    resources, so a variant passes when at least one of them compiles within the shared-memory limit.
    """
    for gen in REGISTRY:
        yield from gen(family)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--filter", default="", help="only variants whose label contains this")
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch:
        family = "hopper" if arch >= 90 else "ampere" if arch >= 80 else "older"
        limit = SHARED_LIMIT.get(arch, 49152)
        for label, kernel, ptrs, const, configs, (unit, aligned) in variants(family):
            if args.filter not in label:
                continue
            notes = []
            for warps, stages, tile in configs:  # the first config that fits is enough
                try:
                    compiled = _compile(kernel, ptrs, dict(const, **tile), arch, warps, stages, unit, aligned)
                    smem = compiled.metadata.shared
                except Exception as exc:  # report every failing variant, not just the first
                    lines = str(exc).strip().splitlines()
                    notes.append(lines[-1] if lines else type(exc).__name__)
                    continue
                if smem <= limit:
                    print(f"ok   sm_{arch} {label}: {tile or ''} {warps} warps {stages} stages, shared {smem} B "
                          f"{_resources(compiled)}")
                    break
                notes.append(f"{tile} {stages} stages needs {smem} B shared > {limit}")
            else:
                failures += 1
                print(f"FAIL sm_{arch} {label}: " + "; ".join(notes))
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
