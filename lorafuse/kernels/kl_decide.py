"""KL dynamic selection in few launches: the decision kernel (statistics partials -> per-sample gates)
and the fused "KL select" op (one layer call of the KL method) with its compact torch path.

**kl_decide** -- from the fused GEMM's statistics partials ``part`` (T, M, 2 + 5L) fp32 (columns in
:mod:`lorafuse.kernels.fused_lora_linear`; L = 2 LoRAs, subject then style), per row m the online-
softmax merge over the T N-tiles (as :mod:`lorafuse.kernels.lora_stats`)::

    forward  k_i,m = KL(p0 || p_i) = (M_i - M0) + log(L_i / L0) - W_i / L0
    reverse  k_i,m = KL(p_i || p0) = (M0 - M_i) + log(L0 / L_i) + WR_i / L_i

then per sample g (rows g*R .. g*R + R - 1, R = rows_per_sample) or over all M rows::

    "sample": D_i,g = (1/R) sum_{m in g} k_i,m          "batch": D_i,g = (1/M) sum_m k_i,m
    subject_g = D_c,g >= D_s,g  (tie "subject")   or   D_c,g > D_s,g  (tie "style")
    g_new = (subject_g, 1 - subject_g);  delta = g_new - gates;  gates <- g_new  (in place)

Shapes: gates (G, 2) fp32 (the layer's speculative state, G = M / R); outputs g_new, D, delta each
(G, 2) fp32, new tensors. One program per decision (G programs; "batch": one program for all).

**kl_select** -- y = x W^T + b + sum_i g_i d_i with the gates decided from this very call's statistics
(d_i = s_i (x A_i^T) B_i^T). Triton path, 4 launches: shrink; GEMM + statistics epilogue applying the
previous gates ``state``; kl_decide (updates ``state``); lora_fixup of the flipped samples (a device-
side no-op when nothing flipped). Torch path (:func:`kl_select_torch`, the CPU default; entered
through :func:`kl_select_plain`'s host-cheap checks): no speculation, a compact fp32 sequence of about
twenty aten ops whose decision does not depend on ``state``::

    f0 = x W^T + b (M, N);  U = x a^T;  d = U b_diag viewed (M, L, N): d[m, i] = d_i,m
    forward:  mu = E_p0[d_i],  k_i = log1p(E_p0[expm1(d_i - mu)]) = log E_p0[e^{d_i}] - E_p0[d_i]
    reverse:  nu = E_pi[d_i],  k_i = log1p(E_pi[expm1(nu - d_i)]) = E_pi[d_i] - log E_p0[e^{d_i}]
    p0 = softmax(f0),  p_i = softmax(f0 + d_i) over N;  D as above;  g = onehot(argmax D) (ties by
    the tie rule);  y = f0 + sum_i g_i d_i

Accuracy (fp32): with z = d_i - mu_i, E_p0[z] = 0 and every term p0_j expm1(z_j) is O(z_j), so the sum
k = E[z^2]/2 + O(z^3) carries an absolute error of about eps * E_p0|d_i| (the rounding of mu), whatever
the logits: no cancellation against LSE(f0) (the partials' form (M_i - M0) + log(L_i / L0) - W_i / L0
loses eps * |LSE(f0)|, orders of magnitude more when the KL is far below the logits), and none against
1 (exp(z) - 1 loses eps absolutely: a KL of 1e-6 would keep one digit). Centring also keeps exp in
range for any common shift of d_i. Measured alternatives that stay accurate but lose: expm1(z) =
tanh(z/2) (1 + e^z) in vectorized tanh / exp / mul / addcmul (no measurable gain at the tiny SD1.5 layer,
where per-op overhead dominates; twice the memory passes at SDXL sizes, where the single expm1 pass
wins), a block-diagonal bmm per LoRA or y by a batched GEMV over d (more view ops than they save).

Per call on the CPU (tiny SD1.5 attn1.to_q, x (2, 64, 64), ranks 4 + 16): 23 aten ops (views
included; 21 for 2-D x), below PEFT's own LoRA forward (24); (M, L, N) intermediates are updated in
place (sub_, expm1_) unless autograd needs d.
"""

from __future__ import annotations

import weakref

import torch

from ._common import HAS_TRITON, check_dtype, resolve_backend, traceable
from .fused_lora_linear import num_stat_columns
from .packing import PackedLoRA

if HAS_TRITON:
    import triton
    import triton.language as tl

_WHAT = "kl_decide"
DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("sample", "batch")
TIES = ("subject", "style")


# ------------------------------------------------------------------------------------------------
# kl_decide: reference
# ------------------------------------------------------------------------------------------------
def kl_decide_torch(part: torch.Tensor, gates: torch.Tensor, rows_per_sample: int, forward: bool, batch: bool,
                    tie_subject: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: the same (g_new, D, delta) and the same in-place update of ``gates``; fp64 partials
    give an fp64 D (the decision is computed from it; the outputs are gates' dtype)."""
    from .lora_stats import reduce_lora_stats_torch

    st = reduce_lora_stats_torch(part, 2)
    k = st.kl if forward else st.kl_reverse  # (M, 2)
    G = gates.shape[0]
    D = k.mean(dim=0, keepdim=True).expand(G, 2) if batch else k.reshape(G, rows_per_sample, 2).mean(dim=1)
    subject = D[:, 0] >= D[:, 1] if tie_subject else D[:, 0] > D[:, 1]
    new = torch.stack((subject, ~subject), dim=1).to(gates.dtype)
    delta = new - gates
    gates.copy_(new)
    return new, D.to(gates.dtype), delta


# ------------------------------------------------------------------------------------------------
# kl_decide: kernel
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _row_base(rows, T, stride_pt, mask):
        """Per row (M0, L0): max of f0 and sum of exp(f0 - M0), merged over the T tiles."""
        M0 = tl.load(rows, mask=mask, other=0.0)  # tile 0 seeds the max: no -inf - -inf
        for t in range(1, T):
            M0 = tl.maximum(M0, tl.load(rows + t * stride_pt, mask=mask, other=0.0))
        L0 = tl.zeros_like(M0)
        for t in range(0, T):
            tile = rows + t * stride_pt
            L0 += tl.load(tile + 1, mask=mask, other=1.0) * tl.exp(tl.load(tile, mask=mask, other=0.0) - M0)
        return M0, L0

    @triton.jit
    def _row_kl(rows, T, stride_pt, mask, col, M0, L0, FORWARD: tl.constexpr):
        """Per row KL of the LoRA whose partials start at column ``col`` (w, m, l, wr, e)."""
        Mi = tl.load(rows + col + 1, mask=mask, other=0.0)
        for t in range(1, T):
            Mi = tl.maximum(Mi, tl.load(rows + t * stride_pt + col + 1, mask=mask, other=0.0))
        Li = tl.zeros_like(M0)
        X = tl.zeros_like(M0)  # W_i (forward) or WR_i (reverse)
        for t in range(0, T):
            tile = rows + t * stride_pt
            si = tl.exp(tl.load(tile + col + 1, mask=mask, other=0.0) - Mi)
            Li += tl.load(tile + col + 2, mask=mask, other=1.0) * si
            if FORWARD:
                X += tl.load(tile + col, mask=mask, other=0.0) * tl.exp(tl.load(tile, mask=mask, other=0.0) - M0)
            else:
                X += tl.load(tile + col + 3, mask=mask, other=0.0) * si
        if FORWARD:
            k = (Mi - M0) + tl.log(Li / L0) - X / L0
        else:
            k = (M0 - Mi) + tl.log(L0 / Li) + X / Li
        return tl.where(mask, k, 0.0)

    @triton.jit
    def _kl_decide_kernel(
        part_ptr, gate_ptr, new_ptr, div_ptr, delta_ptr,   # tensors: partials, state (in place), 3 outputs
        M, T, G, rows_per_sample,                          # sizes
        stride_pt, stride_pm, stride_gs, stride_gl,        # strides: partials (tile, row), gates (sample, lora)
        FORWARD: tl.constexpr, BATCH: tl.constexpr, TIE_SUBJECT: tl.constexpr,  # the method's options
        BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        # this program's rows and the samples its decision applies to
        pid = tl.program_id(0)
        if BATCH:
            row0 = 0
            nrows = M
            s0 = 0
            s1 = G
        else:
            row0 = pid * rows_per_sample
            nrows = rows_per_sample
            s0 = pid
            s1 = pid + 1

        # ---- mean per-row KL of each LoRA over the rows (fixed order: deterministic)
        acc_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, nrows, BLOCK_M):
            offs = start + tl.arange(0, BLOCK_M)
            mask = offs < nrows
            rows = part_ptr + (row0 + offs) * stride_pm
            M0, L0 = _row_base(rows, T, stride_pt, mask)
            acc_c += _row_kl(rows, T, stride_pt, mask, 2, M0, L0, FORWARD)
            acc_s += _row_kl(rows, T, stride_pt, mask, 7, M0, L0, FORWARD)
        d_c = tl.sum(acc_c, axis=0) / nrows
        d_s = tl.sum(acc_s, axis=0) / nrows

        # ---- decide, write the new gates (state and output), the divergences and the delta
        if TIE_SUBJECT:
            g_c = (d_c >= d_s).to(tl.float32)
        else:
            g_c = (d_c > d_s).to(tl.float32)
        g_s = 1.0 - g_c
        for first in range(s0, s1, BLOCK_G):
            sm = first + tl.arange(0, BLOCK_G)
            smask = sm < s1
            state = gate_ptr + sm * stride_gs
            old_c = tl.load(state, mask=smask, other=0.0)
            old_s = tl.load(state + stride_gl, mask=smask, other=0.0)
            new_c = tl.zeros((BLOCK_G,), dtype=tl.float32) + g_c
            new_s = tl.zeros((BLOCK_G,), dtype=tl.float32) + g_s
            tl.store(state, new_c, mask=smask)
            tl.store(state + stride_gl, new_s, mask=smask)
            out = sm * 2  # the outputs are fresh contiguous (G, 2)
            tl.store(new_ptr + out, new_c, mask=smask)
            tl.store(new_ptr + out + 1, new_s, mask=smask)
            tl.store(delta_ptr + out, new_c - old_c, mask=smask)
            tl.store(delta_ptr + out + 1, new_s - old_s, mask=smask)
            tl.store(div_ptr + out, tl.zeros((BLOCK_G,), dtype=tl.float32) + d_c, mask=smask)
            tl.store(div_ptr + out + 1, tl.zeros((BLOCK_G,), dtype=tl.float32) + d_s, mask=smask)


DECIDE_BLOCK_M = 128
DECIDE_BLOCK_G = 16


def launch_kl_decide(part, gates, new, div, delta, rows_per_sample, forward, batch, tie_subject,
                     wrap=lambda k: k) -> None:
    """Launch the decision kernel; no checks (see :func:`kl_decide`)."""
    T, M, _ = part.shape
    G = gates.shape[0]
    wrap(_kl_decide_kernel)[(1 if batch else G,)](
        part, gates, new, div, delta,
        M, T, G, rows_per_sample,
        part.stride(0), part.stride(1), gates.stride(0), gates.stride(1),
        FORWARD=forward, BATCH=batch, TIE_SUBJECT=tie_subject, BLOCK_M=DECIDE_BLOCK_M, BLOCK_G=DECIDE_BLOCK_G,
    )


def _decide_outputs(gates: torch.Tensor):
    return tuple(torch.empty(gates.shape[0], 2, dtype=torch.float32, device=gates.device) for _ in range(3))


def kl_decide_triton(part: torch.Tensor, gates: torch.Tensor, rows_per_sample: int, forward: bool, batch: bool,
                     tie_subject: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton decision (same signature and results as :func:`kl_decide_torch`), launched directly."""
    new, div, delta = _decide_outputs(gates)
    if gates.shape[0] and part.shape[1]:
        launch_kl_decide(part, gates, new, div, delta, rows_per_sample, forward, batch, tie_subject)
    return new, div, delta


if HAS_TRITON:
    from torch.library import triton_op

    @triton_op("lorafuse::kl_decide", mutates_args={"gates"})
    def _decide_op(
        part: torch.Tensor, gates: torch.Tensor, rows_per_sample: int, forward: bool, batch: bool, tie_subject: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new, div, delta = _decide_outputs(gates)
        if gates.shape[0] > 0 and part.shape[1] > 0:
            launch_kl_decide(part, gates, new, div, delta, rows_per_sample, forward, batch, tie_subject,
                             wrap=traceable)
        return new, div, delta

    @_decide_op.register_fake
    def _decide_op_fake(part, gates, rows_per_sample, forward, batch, tie_subject):
        # explicit, so shape propagation never reaches the launcher (the interpreter would run it)
        return tuple(gates.new_empty((gates.shape[0], 2)) for _ in range(3))


def _check_options(direction: str, reduction: str, tie: str, what: str) -> tuple[bool, bool, bool]:
    for name, value, choices in (("direction", direction, DIRECTIONS), ("reduction", reduction, REDUCTIONS),
                                 ("tie", tie, TIES)):
        if value not in choices:
            raise ValueError(f"{what}: {name} must be one of {choices}, got {value!r}")
    return direction == "forward", reduction == "batch", tie == "subject"


#: (direction, reduction, tie) -> (forward, batch, tie_subject), looked up per call (checked options)
_FLAGS = {(d, r, t): (d == "forward", r == "batch", t == "subject") for d in DIRECTIONS for r in REDUCTIONS
          for t in TIES}


def kl_decide(
    partials: torch.Tensor,
    gates: torch.Tensor,
    rows_per_sample: int,
    *,
    direction: str = "forward",
    reduction: str = "sample",
    tie: str = "subject",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decide the KL gates of one layer call from the fused kernel's statistics (module docstring).

    Args:
        partials: (T, M, 12) fp32, the partials of :func:`~lorafuse.kernels.fused_lora_forward` with
            ``stats=True`` for two LoRAs (subject, style).
        gates: (G, 2) fp32 contiguous, the gates the fused call applied; overwritten with the new ones.
        rows_per_sample: R, with G * R = M (each sample owns R contiguous rows).
        direction: "forward" KL(p0 || p_i) or "reverse" KL(p_i || p0); reduction: "sample" or "batch";
        tie: "subject" (D_c >= D_s selects the subject) or "style" (D_c > D_s).
        backend: "auto" | "triton" | "torch".

    Returns:
        (g_new, D, delta): each (G, 2) fp32 and new: the new gates, the divergences D_i, g_new - gates.
    """
    forward, batch, tie_subject = _check_options(direction, reduction, tie, _WHAT)
    if not isinstance(partials, torch.Tensor) or not isinstance(gates, torch.Tensor):
        raise TypeError(f"{_WHAT}: partials and gates must be tensors")
    if partials.dim() != 3 or partials.shape[2] != num_stat_columns(2) or partials.dtype != torch.float32:
        raise ValueError(f"{_WHAT}: partials must be fp32 (tiles, rows, {num_stat_columns(2)}) for two LoRAs, got "
                         f"{partials.dtype} {tuple(partials.shape)}")
    if gates.dim() != 2 or gates.shape[1] != 2 or gates.dtype != torch.float32 or not gates.is_contiguous():
        raise ValueError(f"{_WHAT}: gates must be a contiguous fp32 (batch, 2) tensor (updated in place), got "
                         f"{gates.dtype} {tuple(gates.shape)}")
    if gates.device != partials.device:
        raise ValueError(f"{_WHAT}: gates are on {gates.device} but partials on {partials.device}")
    M = partials.shape[1]
    if isinstance(rows_per_sample, bool) or not isinstance(rows_per_sample, int) or rows_per_sample < 1 or \
            gates.shape[0] * rows_per_sample != M:
        raise ValueError(f"{_WHAT}: gates have {gates.shape[0]} samples of rows_per_sample={rows_per_sample!r} rows "
                         f"but the partials have {M} rows")
    if resolve_backend(backend, partials.device, _WHAT) == "triton":
        part = partials if partials.stride(2) == 1 else partials.contiguous()
        return _decide_op(part, gates, rows_per_sample, forward, batch, tie_subject)
    return kl_decide_torch(partials, gates, rows_per_sample, forward, batch, tie_subject)


# ------------------------------------------------------------------------------------------------
# kl_select: the fused layer call
# ------------------------------------------------------------------------------------------------
_FACTORS: "weakref.WeakKeyDictionary[PackedLoRA, tuple]" = weakref.WeakKeyDictionary()


def _select_factors(packed: PackedLoRA) -> tuple:
    """(a_t (K, L r), b_diag (L r, L N), b_t (L r, N), one-hot rows (2, 2) by argmax, by argmin, then
    N, K, dtype, device) made once per packed layer: fp32 factors, and what :func:`kl_select_plain`
    checks each call against. a_t holds each LoRA's A_i^T in a block of width r = max rank
    (zero-padded), b_t the (s_i B_i)^T blocks, b_diag the same blocks on the block diagonal, so that
    ``(x a_t) b_diag`` viewed (M, L, N) is d[m, i, :] = d_i,m."""
    got = _FACTORS.get(packed)
    if got is not None:
        return got
    L, R, r = packed.num_loras, packed.rank_block, max(packed.ranks)
    N, K = packed.out_features, packed.in_features
    a_t = torch.zeros(K, L * r, dtype=torch.float32, device=packed.device)
    b_t = torch.zeros(L * r, N, dtype=torch.float32, device=packed.device)
    b_diag = torch.zeros(L * r, L * N, dtype=torch.float32, device=packed.device)
    for i, ri in enumerate(packed.ranks):
        a_t[:, i * r : i * r + ri] = packed.a[i * R : i * R + ri].t()
        b_t[i * r : i * r + ri] = packed.b[:, i * R : i * R + ri].t()
        b_diag[i * r : (i + 1) * r, i * N : (i + 1) * N] = b_t[i * r : (i + 1) * r]
    eye = torch.eye(2, dtype=torch.float32, device=packed.device)
    got = _FACTORS[packed] = (a_t, b_diag, b_t, eye, eye.flip(1).contiguous(), N, K, packed.dtype, packed.device)
    return got


def kl_select_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedLoRA,
                    num_samples: int, forward: bool, batch: bool, tie_subject: bool):
    """The compact fp32 torch path of :func:`kl_select` (module docstring): x (..., K) with
    num_samples * R rows -> (y (..., N) in x's dtype, gates (G, 2), D (G, 2)), all new tensors.
    About twenty aten ops, none of them per LoRA; nothing depends on earlier calls. Zero LoRAs have
    k = 0 exactly (expm1(0) = 0), so they tie exactly."""
    return _select(x, weight, bias, _select_factors(packed), num_samples, forward, batch, tie_subject)


def kl_divergences(f0: torch.Tensor, d: torch.Tensor, forward: bool) -> torch.Tensor:
    """Per row m and LoRA i, the divergence between the output distributions without and with the
    LoRA, centred on the mean delta (module docstring: accurate in fp32)::

        forward:  k_i,m = KL(p0 || p_i) = log1p(E_p0[expm1(d_i - mu_i)]),  mu_i = E_p0[d_i]
        reverse:  k_i,m = KL(p_i || p0) = log1p(E_pi[expm1(nu_i - d_i)]),  nu_i = E_pi[d_i]

    p0 = softmax(f0_m), p_i = softmax(f0_m + d_i,m) over the N channels. f0 (M, N), d (M, L, N), one
    floating dtype -> k (M, L, 1). ``d`` is overwritten (no (M, L, N) buffer allocated) unless
    autograd needs it."""
    if forward:
        p0 = torch.softmax(f0, dim=-1).unsqueeze(-1)  # (M, N, 1)
        mu = torch.bmm(d, p0)  # (M, L, 1)
        if d.requires_grad:  # autograd through x (guidance): bmm saved d
            return torch.log1p(torch.bmm(torch.expm1(d - mu), p0))
        return torch.bmm(d.sub_(mu).expm1_(), p0).log1p_()
    p = torch.softmax(d + f0.unsqueeze(1), dim=-1)  # (M, L, N): p_i = softmax(f0 + d_i)
    nu = (p * d).sum(dim=-1, keepdim=True)
    if d.requires_grad:
        return torch.log1p((p * torch.expm1(nu - d)).sum(dim=-1, keepdim=True))
    return torch.sub(nu, d).expm1_().mul_(p).sum(dim=-1, keepdim=True).log1p_()


def _select(x, weight, bias, factors, num_samples, forward, batch, tie_subject):
    """:func:`kl_select_torch` with the packed layer's factors already looked up."""
    a_t, b_diag, b_t, by_max, by_min = factors[:5]
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    L = 2
    if x.dtype != torch.float32:
        x2, weight = x2.float(), weight.float()
        bias = bias.float() if bias is not None else None
    f0 = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    u = torch.mm(x2, a_t)  # (M, L r)
    d = torch.mm(u, b_diag).view(M, L, N)  # d[m, i] = d_i,m
    k = kl_divergences(f0, d, forward)  # d is not needed after this (y comes from U)
    G = 1 if batch else num_samples
    D = k.view(G, M // G, L).mean(dim=1)  # (G, L)
    # one-hot of the winner; torch's argmax / argmin return the first index among equal values
    gates = by_max.index_select(0, D.argmax(dim=1)) if tie_subject else by_min.index_select(0, D.argmin(dim=1))
    # y = f0 + sum_i g_i d_i as f0 + (U gated per sample and LoRA) b_t: one addmm (a batched GEMV
    # over d is slower on CPUs)
    ug = u.view(G, M // G, L, -1) * gates.view(G, 1, L, 1)
    y = torch.addmm(f0, ug.view(M, -1), b_t)
    if x.dim() != 2:
        y = y.view(*lead, N)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if batch:
        gates, D = gates.expand(num_samples, L), D.expand(num_samples, L)
    return y, gates, D


def kl_select_plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedLoRA,
                    forward: bool, batch: bool, tie_subject: bool):
    """:func:`kl_select_torch` when the call is plain, else None (then :func:`kl_select` checks
    everything and takes the right path): x (G, ..., K) or (K,) not empty, weight (N, K) and bias
    (N,) or None of x's dtype and device, packed two LoRAs of that dtype and device. Host-cheap
    checks only (no aten op), for callers that know the backend is torch (KLDynamic.layer_forward)."""
    got = _FACTORS.get(packed)
    if got is None:
        if not isinstance(packed, PackedLoRA) or packed.num_loras != 2:
            return None
        got = _select_factors(packed)
    N, K, dtype, device = got[5:]
    xs = x.shape
    if not (xs and xs[-1] == K and x.dtype is dtype and isinstance(weight, torch.Tensor) and weight.shape == (N, K)
            and weight.dtype is dtype and x.numel() and x.device == device and weight.device == device):
        return None
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (N,) and bias.dtype is dtype
                                 and bias.device == device):
        return None
    return _select(x, weight, bias, got, xs[0] if len(xs) >= 2 else 1, forward, batch, tie_subject)


def kl_select_traced(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedLoRA,
                     forward: bool, batch: bool, tie_subject: bool):
    """:func:`kl_select_torch` for a ``torch.compile`` graph: the same math in plain ops that Inductor
    fuses, reading nothing but the arguments (no factor cache: a lookup keyed by the pack would put a
    guard on it into the graph). x (G, ..., K) or (K,) not empty, weight (N, K), bias (N,) or None,
    packed two LoRAs in x's dtype -> (y (..., N) in x's dtype, gates (G, 2), D (G, 2)), all new; fp32
    inside::

        f0 = x W^T + b (M, N);  U = x a^T (M, 2R) on the padded blocks (zero columns give zero deltas)
        d = bmm(U viewed (2, M, R), b viewed (2, R, N))  (2, M, N): d[i, m] = d_i,m
        forward:  p0 = softmax(f0);  mu_i = sum_n p0 d_i;  k_i = log1p(sum_n p0 expm1(d_i - mu_i))
        reverse:  p_i = softmax(f0 + d_i);  nu_i = sum_n p_i d_i;  k_i = log1p(sum_n p_i expm1(nu_i - d_i))
        D (G, 2) the per-sample (or batch) mean of k;  g = onehot(D_c >= D_s) (tie "subject"; > for "style")
        y = f0 + g_c d_c + g_s d_s   (one pointwise pass over the (M, N) pieces)

    The reductions run as sums over N (Inductor fuses them with the softmax and expm1 into one loop
    nest per row) rather than the eager path's bmm; y is a pointwise pass over d rather than a second
    GEMM with the gated U. Same decisions and outputs as :func:`kl_select_torch` within fp32 rounding.
    Returns None when the call is not plain (then :func:`kl_select` checks everything)."""
    N, K = weight.shape if weight.dim() == 2 else (-1, -1)
    if not (x.dim() >= 1 and packed.num_loras == 2 and x.shape[-1] == K == packed.in_features and packed.out_features == N
            and x.dtype == weight.dtype == packed.dtype and (bias is None or bias.shape == (N,) and bias.dtype == x.dtype)
            and x.numel() > 0):
        return None
    G = x.shape[0] if x.dim() >= 2 else 1
    x2 = x.reshape(-1, K).float()
    M, R = x2.shape[0], packed.rank_block
    f0 = torch.nn.functional.linear(x2, weight.float(), bias.float() if bias is not None else None)
    u = torch.mm(x2, packed.a.float().t())  # (M, 2R)
    d = torch.bmm(u.view(M, 2, R).transpose(0, 1), packed.b.float().view(N, 2, R).permute(1, 2, 0))  # (2, M, N)
    if forward:
        p = torch.softmax(f0, dim=-1)  # (M, N), shared by both LoRAs
        mu = (p * d).sum(dim=-1, keepdim=True)  # (2, M, 1)
        k = torch.log1p((p * torch.expm1(d - mu)).sum(dim=-1))  # (2, M)
    else:
        p = torch.softmax(f0 + d, dim=-1)  # (2, M, N)
        nu = (p * d).sum(dim=-1, keepdim=True)
        k = torch.log1p((p * torch.expm1(nu - d)).sum(dim=-1))
    S = 1 if batch else G
    D = k.view(2, S, M // S).mean(dim=-1).t()  # (S, 2)
    subject = D[:, 0] >= D[:, 1] if tie_subject else D[:, 0] > D[:, 1]
    gates = torch.stack((subject, ~subject), dim=1).float()  # (S, 2)
    g = gates.view(S, 1, 2, 1)
    y = f0.view(S, M // S, N) + g[:, :, 0] * d[0].view(S, M // S, N) + g[:, :, 1] * d[1].view(S, M // S, N)
    y = y.view(*x.shape[:-1], N).to(x.dtype)
    if batch:
        gates, D = gates.expand(G, 2), D.expand(G, 2)
    return y, gates, D


def kl_select(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: PackedLoRA,
    state: torch.Tensor,
    *,
    direction: str = "forward",
    reduction: str = "sample",
    tie: str = "subject",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One KL-selected layer call: ``y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T`` with the gates
    g (G, 2) decided from this call's own statistics (module docstring).

    Args:
        x: (G, ..., K) (G samples, each owning its contiguous rows) or (K,) (one sample of one row).
        weight (N, K), bias (N,) or None, packed: the two LoRAs (subject, style), x's dtype.
        state: (G, 2) fp32 contiguous, the previous gates of this layer: the Triton path runs the GEMM
            with them and writes the new gates into it (speculation + fix-up); the torch path ignores it.
        direction, reduction, tie: as :func:`kl_decide`. backend: "auto" | "triton" | "torch".

    Returns:
        (y (..., N) in x's dtype, gates (G, 2) fp32, D (G, 2) fp32), the last two new tensors (safe to
        keep: nothing updates them later).
    """
    what = "kl_select"
    flags = _FLAGS.get((direction, reduction, tie))
    if flags is None:
        flags = _check_options(direction, reduction, tie, what)  # raises
    if not isinstance(packed, PackedLoRA) or packed.num_loras != 2:
        raise ValueError(f"{what}: packed must be a PackedLoRA of two LoRAs (subject, style)")
    check_dtype("x", x, what)
    G = x.shape[0] if x.dim() >= 2 else 1
    if state.shape != (G, 2) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"{what}: state must be contiguous fp32 ({G}, 2) for x of shape {tuple(x.shape)}, got "
                         f"{state.dtype} {tuple(state.shape)}")
    if (backend == "auto" and not x.is_cuda) or resolve_backend(backend, x.device, what) == "torch":
        out = kl_select_plain(x, weight, bias, packed, *flags)
        if out is not None:
            return out
        from .api import fused_lora_linear  # the full checks and their errors; empty inputs

        y = fused_lora_linear(x, weight, bias, packed, gates=state if x.dim() >= 2 else state[0], backend="torch")
        return y, state.clone(), torch.zeros_like(state)
    from .api import fused_lora_forward, lora_fixup

    gates = state if x.dim() >= 2 else state[0]
    out = fused_lora_forward(x, weight, bias, packed, gates=gates, stats=True, backend="triton")
    new, D, delta = kl_decide(out.partials, state, out.rows_per_sample, direction=direction,
                              reduction=reduction, tie=tie, backend="triton")
    lora_fixup(out.y, out.u, packed, delta, out.rows_per_sample, backend="triton")
    return out.y, new, D


__all__ = ["kl_decide", "kl_divergences", "kl_decide_torch", "kl_decide_triton", "kl_select", "kl_select_plain", "kl_select_torch",
           "kl_select_traced"]
