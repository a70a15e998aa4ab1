"""Shared host-side helpers of the kernels: backend choice, tile tables, argument checks.

Nothing here launches work on a device; the kernels' files import these helpers.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch.library import wrap_triton

try:  # Triton is a hard dependency on Linux, but keep `import lorafuse` working without it.
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without Triton wheels
    triton = None
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")
# tl.dot needs every operand dimension >= 16, so each LoRA's rank is padded to this multiple.
RANK_MULTIPLE = 16


def interpreter_active() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run lorafuse's kernels in this environment, or None.

    Triton <= 3.6's interpreter turns a scalar kernel argument into a 1-element array and converts
    it back with ``int(array)`` (``tensor.__index__``: every loop bounded by a runtime size, e.g.
    ``range(tl.cdiv(K, BLOCK_K))``); NumPy >= 2.4 rejects that conversion (deprecated since 1.25).
    Triton 3.7 converts with ``.squeeze()``. GPU compilation is unaffected: this is the CPU
    interpreter only.
    """
    if not HAS_TRITON:
        return None
    import numpy

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter cannot run with NumPy {numpy.__version__} "
                "(it converts 1-element arrays with int(), which NumPy >= 2.4 rejects; fixed in Triton 3.7): "
                'install "numpy<2.4" or Triton >= 3.7 to run the kernels with TRITON_INTERPRET=1')
    return None


def traceable(kernel):
    """``torch.library.wrap_triton(kernel)``, the launch form a ``triton_op`` body uses so that
    tracing (torch.compile, make_fx) sees the kernel; under the interpreter the kernel itself.

    An interpreted kernel (``TRITON_INTERPRET=1``) launches eagerly but cannot be traced: torch 2.13's
    ``wrap_triton`` hands it back unchanged, older releases (2.6-2.12) reject it with a RuntimeError.
    Returning it here gives every supported torch the 2.13 behaviour.
    """
    return kernel if interpreter_active() else wrap_triton(kernel)


def resolve_backend(backend: str, device: torch.device, what: str = "fused_lora_linear") -> str:
    """Map ``backend`` ("auto" | "triton" | "torch") to the implementation that runs on ``device``.

    "auto" picks Triton for CUDA tensors and the torch reference everywhere else; "triton" forces the
    kernels and needs CUDA tensors or the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    usable = HAS_TRITON and (device.type == "cuda" or interpreter_active())
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{what}: backend='triton' but Triton is not installed")
        if not usable:
            raise ValueError(
                f"{what}: backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1"
            )
        if device.type != "cuda" and interpreter_problem():
            raise RuntimeError(f"{what}: backend='triton' on {device.type}: {interpreter_problem()}")
        return "triton"
    return "triton" if HAS_TRITON and device.type == "cuda" else "torch"


def padded_rank(rank: int) -> int:
    """Rank rounded up to a multiple of 16 (the smallest K of a tensor-core ``tl.dot``)."""
    return max(RANK_MULTIPLE, -(-rank // RANK_MULTIPLE) * RANK_MULTIPLE)


#: widest rank slice one ``tl.dot`` of the expand takes (a [BLOCK_M, 64] fp32 U tile plus its
#: [64, BLOCK_N] B tile stay in registers beside the GEMM accumulator)
MAX_RANK_CHUNK = 64


def rank_chunk(ranks, rank_block: int) -> int:
    """Width of the rank slices the expand kernels loop over: the largest power of two (16..64) that
    divides ``rank_block`` and every padded rank, so no LoRA is read past its own 16-padded rank.

    ``tl.arange`` needs a power of two, ``tl.dot`` K >= 16; rank_block 48 -> 16 (3 slices), 96 -> 32,
    128 -> 64, 208 -> 16. Ranks (4, 64) (block 64) -> 16: LoRA 0 costs one slice, not four.
    """
    g = rank_block
    for r in ranks:
        g = math.gcd(g, padded_rank(r))
    chunk = g & -g  # the largest power of two dividing all of them (>= 16: each is a multiple of 16)
    return max(RANK_MULTIPLE, min(MAX_RANK_CHUNK, chunk))


def lora_chunks(ranks, chunk: int) -> tuple[int, ...]:
    """Rank slices of width ``chunk`` that hold LoRA i's columns (the rest of its block is zero padding
    the kernels skip): ``ceil(ceil16(r_i) / chunk)`` per LoRA."""
    return tuple(-(-padded_rank(r) // chunk) for r in ranks)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_dtype(name: str, t: torch.Tensor, what: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: {name} has dtype {t.dtype}; supported are float16, bfloat16 and float32")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands: follow torch's own TF32 switch (ignored for 16-bit)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def device_family(index: int) -> str:
    """'hopper' (sm_90+), 'ampere' (sm_80/86/89) or 'older' for a CUDA device index."""
    major, _ = torch.cuda.get_device_capability(index)
    return "hopper" if major >= 9 else "ampere" if major >= 8 else "older"


def tile_configs(table: dict, interpret_config: dict) -> list:
    """``triton.Config`` objects for ``@triton.autotune``: every GPU family's candidates, or the one
    interpreter config (autotuning with several configs fails without a GPU).

    Each config is tagged with its family in ``config.family`` so ``prune_by_family`` can keep the
    ones meant for the device the kernel is launched on.
    """
    if interpreter_active() or not HAS_TRITON:
        cfg = triton.Config(dict(interpret_config), num_warps=4, num_stages=1) if HAS_TRITON else None
        if cfg is not None:
            cfg.family = "interpreter"
        return [cfg]
    configs = []
    for family, entries in table.items():
        for kw, warps, stages in entries:
            cfg = triton.Config(dict(kw), num_warps=warps, num_stages=stages)
            cfg.family = family
            configs.append(cfg)
    return configs


def autotune_enabled() -> bool:
    """False when ``LORAFUSE_AUTOTUNE=0``: every tiled kernel then compiles and runs only the first
    config of its device's table (correctness checks that would otherwise spend minutes tuning)."""
    return os.environ.get("LORAFUSE_AUTOTUNE", "1") not in ("0", "")


def prune_by_family(tensor_arg: str):
    """``early_config_prune`` hook: keep only the configs of the launching device's family (only the
    first of them with ``LORAFUSE_AUTOTUNE=0``)."""

    def prune(configs, named_args, **kwargs):
        t = named_args[tensor_arg]
        if not (isinstance(t, torch.Tensor) and t.is_cuda):
            return configs[:1]
        family = device_family(t.device.index if t.device.index is not None else torch.cuda.current_device())
        kept = [c for c in configs if getattr(c, "family", None) == family]
        if not kept:
            kept = [c for c in configs if getattr(c, "family", None) == "ampere"] or configs[:1]
        return kept if autotune_enabled() else kept[:1]

    return prune
