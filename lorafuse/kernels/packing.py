"""Weight-only preparation of a layer's LoRAs, done once and reused for every call.

For LoRAs ``(A_i, B_i, s_i)``, i = 0..L-1, with ``A_i``: (r_i, K) and ``B_i``: (N, r_i), the packed
form uses one rank block of width ``R = max_i ceil16(r_i)`` per LoRA (zero rows / columns pad the
smaller ranks, so the padding contributes exact zeros)::

    a: (L * R, K)   a[i*R : i*R + r_i]    = A_i
    b: (N, L * R)   b[:, i*R : i*R + r_i] = s_i * B_i         (scale folded into B)

so that ``sum_i s_i (x A_i^T) B_i^T = (x a^T) b^T`` and LoRA i owns the columns ``[i*R, (i+1)*R)`` of
the shrink ``U = x a^T``. Uniform blocks let the kernels address LoRA i with compile-time offsets; the
expand kernels read each block in slices of 16, 32 or 64 columns and stop after LoRA i's own 16-padded
rank, so a rank-4 LoRA beside a rank-200 one costs one 16-wide slice, not 208 columns (any rank 1..512).
The torch path (CPU) uses the unpadded concatenations ``a_compact`` (sum r_i, K) and ``b_compact``
(N, sum r_i) instead: on a CPU padding is pure waste.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch

from ._common import SUPPORTED_DTYPES, padded_rank

_WHAT = "PackedLoRA"


def _check_scale(i: int, scale) -> torch.Tensor | float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{_WHAT}: scale of LoRA {i} must be a float or a 0-d tensor, got shape {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()):  # one sync at pack time, never per call
            raise ValueError(f"{_WHAT}: scale of LoRA {i} is not finite ({scale.item()})")
        return scale.reshape(())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{_WHAT}: scale of LoRA {i} must be a float or a 0-d tensor, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{_WHAT}: scale of LoRA {i} is not finite ({scale})")
    return float(scale)


def check_not_bare_triple(loras, what: str = _WHAT) -> None:
    """ValueError for one bare ``(A, B, scale)`` passed where a sequence of such triples belongs
    (``[(A, B, scale)]``): without this check its A would be read as LoRA 0 and fail obscurely."""
    if (
        isinstance(loras, (list, tuple))
        and len(loras) == 3
        and isinstance(loras[0], torch.Tensor)
        and isinstance(loras[1], torch.Tensor)
        and loras[0].dim() == 2
    ):
        raise ValueError(
            f"{what}: loras must be a sequence of (A, B, scale) triples, got a single (A, B, scale) triple; "
            "wrap it in a list: [(A, B, scale)]"
        )


@dataclass(eq=False)
class CallNotes:
    """What a fusion method leaves on a pack about the last layer call made with it, for readers
    outside the call. Inside a ``torch.compile`` graph an attribute written on an object reached
    through the call's arguments is replayed after the graph, with no guard on which layer it is (a
    write indexed by the layer's number would specialise the graph on that number: one recompile per
    layer under regional compilation). ``decision``: (gates (G, L), statistics (G, L)) or None."""

    decision: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True, eq=False)
class PackedLoRA:
    """Concatenated, rank-padded, scale-folded LoRA factors of one linear layer.

    Build it with :meth:`pack` (or ``PackedLoRA.pack(loras, dtype=..., device=...)``) and pass it to
    :func:`lorafuse.kernels.fused_lora_linear` in place of the raw ``loras`` sequence.

    Attributes:
        a: (num_loras * rank_block, in_features) down factors, one rank block per LoRA.
        b: (out_features, num_loras * rank_block) up factors times their scale.
        ranks: the true rank of each LoRA.
        rank_block: R, the padded width of every LoRA's block (a multiple of 16).
        a_compact, b_compact: the same factors without padding (rows / columns ``offset(i)`` on).
        compact_lora: (sum r_i,) int64, the LoRA each compact column belongs to.
        notes: :class:`CallNotes` of the last layer call made with this pack (a new pack, new notes).
    """

    a: torch.Tensor
    b: torch.Tensor
    ranks: tuple[int, ...]
    rank_block: int
    a_compact: torch.Tensor
    b_compact: torch.Tensor
    compact_lora: torch.Tensor
    notes: CallNotes = field(default_factory=CallNotes, repr=False)

    @property
    def num_loras(self) -> int:
        return len(self.ranks)

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    @classmethod
    def pack(
        cls,
        loras: Sequence,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "PackedLoRA":
        """Pack ``loras``, a sequence of ``(A, B, scale)``; ``dtype``/``device`` default to the first A's.

        Raises ValueError/TypeError (naming the LoRA and the problem) for an empty sequence, A/B of the
        wrong rank or shape, LoRAs of different in/out features, unsupported dtypes, factors on
        different devices and non-finite scales.
        """
        if isinstance(loras, PackedLoRA):
            return loras.to(dtype=dtype, device=device)
        check_not_bare_triple(loras)
        if not isinstance(loras, (list, tuple)) or len(loras) == 0:
            raise ValueError(f"{_WHAT}: loras must be a non-empty sequence of (A, B, scale), got {type(loras).__name__}")
        factors = []
        for i, item in enumerate(loras):
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                raise TypeError(f"{_WHAT}: LoRA {i} must be an (A, B, scale) triple")
            A, B, scale = item
            if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
                raise TypeError(f"{_WHAT}: LoRA {i}: A and B must be tensors")
            if A.dim() != 2 or B.dim() != 2:
                raise ValueError(
                    f"{_WHAT}: LoRA {i}: A must be (r, K) and B (N, r), got A {tuple(A.shape)} and B {tuple(B.shape)}"
                )
            if A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"{_WHAT}: LoRA {i}: rank mismatch, A has {A.shape[0]} rows but B has {B.shape[1]} columns"
                )
            if A.shape[0] == 0:
                raise ValueError(f"{_WHAT}: LoRA {i} has rank 0")
            for name, t in (("A", A), ("B", B)):
                if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
                    raise TypeError(f"{_WHAT}: LoRA {i}: {name} has unsupported dtype {t.dtype}")
            if A.device != B.device:
                raise ValueError(f"{_WHAT}: LoRA {i}: A is on {A.device} but B is on {B.device}")
            factors.append((A, B, _check_scale(i, scale)))

        K, N = factors[0][0].shape[1], factors[0][1].shape[0]
        for i, (A, B, _) in enumerate(factors[1:], start=1):
            if A.shape[1] != K:
                raise ValueError(f"{_WHAT}: LoRA {i}: A has {A.shape[1]} input features, LoRA 0 has {K}")
            if B.shape[0] != N:
                raise ValueError(f"{_WHAT}: LoRA {i}: B has {B.shape[0]} output features, LoRA 0 has {N}")
            if A.device != factors[0][0].device:
                raise ValueError(f"{_WHAT}: LoRA {i} is on {A.device}, LoRA 0 on {factors[0][0].device}")

        dtype = dtype or factors[0][0].dtype
        device = torch.device(device) if device is not None else factors[0][0].device
        ranks = tuple(A.shape[0] for A, _, _ in factors)
        R = max(padded_rank(r) for r in ranks)
        L = len(factors)
        a = torch.zeros(L * R, K, dtype=dtype, device=device)
        b = torch.zeros(N, L * R, dtype=dtype, device=device)
        for i, (A, B, scale) in enumerate(factors):
            r = A.shape[0]
            a[i * R : i * R + r].copy_(A)
            # fold the scale in fp32 (or fp64), round once to the packed dtype
            work = torch.float64 if B.dtype == torch.float64 else torch.float32
            s = scale.to(device=B.device, dtype=work) if isinstance(scale, torch.Tensor) else scale
            b[:, i * R : i * R + r].copy_(B.to(work) * s)
        return cls(a, b, ranks, R, *cls._compact(a, b, ranks, R))

    @staticmethod
    def _compact(a: torch.Tensor, b: torch.Tensor, ranks, R: int) -> tuple[torch.Tensor, ...]:
        rows = torch.cat([torch.arange(i * R, i * R + r) for i, r in enumerate(ranks)]).to(a.device)
        owner = torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)]).to(a.device)
        return a.index_select(0, rows), b.index_select(1, rows), owner

    def offset(self, i: int) -> int:
        """First row of LoRA i in ``a_compact`` (column in ``b_compact``)."""
        return sum(self.ranks[:i])

    @cached_property
    def compact_blocks_t(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """``(A_i^T, (s_i B_i)^T)`` per LoRA: transposed, unpadded views of ``a_compact`` /
        ``b_compact`` (made once; the torch path's single-LoRA calls)."""
        blocks = []
        for i, r in enumerate(self.ranks):
            rows = slice(self.offset(i), self.offset(i) + r)
            blocks.append((self.a_compact[rows].t(), self.b_compact[:, rows].t()))
        return tuple(blocks)

    @cached_property
    def finite(self) -> bool:
        """True when every packed factor is finite (one host sync, the first time it is read).

        The torch path skips LoRAs gated to exactly 0 only when this holds, so that both backends
        follow the formula's IEEE semantics (0 * NaN = NaN) for non-finite factors."""
        # .tolist(), as the torch path reads its host gates: only ever called there, on CPU tensors
        return torch.isfinite(self.a_compact).all().tolist() and torch.isfinite(self.b_compact).all().tolist()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "PackedLoRA":
        """A copy in another dtype / on another device (self when nothing changes)."""
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        if dtype == self.dtype and device == self.device:
            return self
        a, b = self.a.to(device, dtype), self.b.to(device, dtype)
        return PackedLoRA(a, b, self.ranks, self.rank_block, *self._compact(a, b, self.ranks, self.rank_block))

    def block(self, i: int) -> slice:
        """Columns of U (and of b) owned by LoRA i, padding included."""
        return slice(i * self.rank_block, (i + 1) * self.rank_block)
