"""fused_lora_linear: Triton (interpreter on CPU) and torch paths against an fp64 formula."""


import pytest
import torch
import torch.nn.functional as F

from lorafuse.kernels import LoRAStats, PackedLoRA, fused_lora_forward, fused_lora_linear, lora_fixup, lora_shrink
from lorafuse.kernels.fused_lora_linear import fused_gemm_expand_torch
from lorafuse.kernels.lora_stats import reduce_lora_stats_torch
from lorafuse.kernels.shrink import lora_shrink_torch

from ..conftest import DEVICE, requires_cuda

BACKENDS = ["triton", "torch"]
# relative Frobenius error ||out - ref|| / ||ref|| by activation dtype
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_layer(M, K, N, ranks, scales, *, bias=True, dtype=torch.float32, lead=None, device=DEVICE):
    """x scaled so that outputs are O(1); LoRA deltas a sizeable fraction of the base."""
    x = torch.randn(*(lead or (M,)), K, device=device).to(dtype)
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    loras = [
        ((torch.randn(r, K, device=device) / K**0.5).to(dtype), (torch.randn(N, r, device=device) / r**0.5).to(dtype), s)
        for r, s in zip(ranks, scales)
    ]
    return x, W, b, loras


def formula64(x, W, b, loras, gates=None):
    """y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T in fp64, LoRA by LoRA, gates per sample."""
    x64 = x.double().cpu()
    y = x64 @ W.double().cpu().t()
    if b is not None:
        y = y + b.double().cpu()
    for i, (A, B, s) in enumerate(loras):
        d = float(s) * (x64 @ A.double().cpu().t()) @ B.double().cpu().t()
        if gates is None:
            g = 1.0
        elif gates.dim() == 1:
            g = float(gates[i])
        else:  # (batch, L): one gate per leading-dim sample, broadcast over its rows
            g = gates[:, i].double().cpu().reshape(-1, *([1] * (x.dim() - 1)))
        y = y + g * d
    return y


def assert_close_rel(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err < REL_TOL[dtype], f"relative error {err:.3e} > {REL_TOL[dtype]:.0e}"


# (M, K, N, ranks, scales): ragged M, K/N not multiples of 16, unequal ranks, rank not a multiple of 16
CASES = [
    (1, 96, 80, (4, 13), (1.0, -0.5)),
    (41, 72, 96, (8, 64), (0.0, 1.0)),
    (77, 96, 80, (13, 4), (-0.5, 1.0)),
    (300, 80, 72, (8, 8), (1.0, 1.0)),
    (77, 128, 128, (64,), (0.7,)),
    (41, 96, 80, (4, 8, 13), (1.0, -0.5, 0.25)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}K{c[1]}N{c[2]}r{'-'.join(map(str, c[3]))}")
def test_matches_fp64_formula(case, dtype, backend):
    M, K, N, ranks, scales = case
    x, W, b, loras = make_layer(M, K, N, ranks, scales, bias=M % 2 == 1, dtype=dtype)
    y = fused_lora_linear(x, W, b, loras, backend=backend)
    assert y.shape == (M, N)
    assert_close_rel(y, formula64(x, W, b, loras), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_kind", ["layer", "layer_one_scaled", "layer_both_scaled", "layer_ones", "sample"])
@pytest.mark.parametrize("bias", [True, False])
def test_gates_and_3d_input(backend, gate_kind, bias):
    # x (batch=3, tokens=13, K): per-sample gates own 13 contiguous rows each. Per-layer gates cover the
    # torch path's shortcuts: one LoRA at gate 1 or another value, every LoRA at gate 1, the general case
    x, W, b, loras = make_layer(None, 72, 80, (4, 13), (1.0, -0.5), bias=bias, lead=(3, 13))
    layer_gates = {"layer": [0.0, 1.0], "layer_one_scaled": [-0.7, 0.0], "layer_both_scaled": [0.4, 1.0],
                   "layer_ones": [1.0, 1.0]}
    if gate_kind in layer_gates:
        gates = torch.tensor(layer_gates[gate_kind], device=DEVICE)
    else:
        gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, -2.0]], device=DEVICE)
    y = fused_lora_linear(x, W, b, loras, gates, backend=backend)
    assert y.shape == (3, 13, 80)
    assert_close_rel(y, formula64(x, W, b, loras, gates), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gates_give_exactly_the_base_linear(backend):
    x, W, b, loras = make_layer(77, 96, 80, (8, 13), (1.0, -0.5))
    y = fused_lora_linear(x, W, b, loras, torch.zeros(2, device=DEVICE), backend=backend)
    if backend == "torch":
        assert torch.equal(y, F.linear(x, W, b))
    else:  # the same GEMM with every LoRA scaled to zero: bit-identical
        zero = [(A, B, 0.0) for A, B, _ in loras]
        assert torch.equal(y, fused_lora_linear(x, W, b, zero, backend=backend))
        assert_close_rel(y, formula64(x, W, b, zero), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_are_independent(backend):
    x, W, b, loras = make_layer(77, 96, 80, (8, 4), (1.0, 1.0))
    packed = PackedLoRA.pack(loras)
    full = fused_lora_linear(x, W, b, packed, backend=backend)
    other = x.clone()
    other[1:] = torch.randn_like(other[1:]) * 100  # row 0 among very different neighbours
    torch.testing.assert_close(fused_lora_linear(other, W, b, packed, backend=backend)[0], full[0], rtol=0, atol=0)
    for rows in (slice(0, 1), slice(64, 77), slice(0, 64), slice(40, 77), slice(13, 14)):
        part = fused_lora_linear(x[rows], W, b, packed, backend=backend)
        aligned = rows.start % 64 == 0  # same position inside the 64-row tile
        tol = 0 if backend == "triton" and aligned else 1e-5
        torch.testing.assert_close(part, full[rows], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_raw_and_noncontiguous_inputs(backend):
    x, W, b, loras = make_layer(41, 96, 80, (13, 8), (0.5, 1.0))
    packed = PackedLoRA.pack(loras)
    assert packed.rank_block == 16 and packed.ranks == (13, 8) and packed.a.shape == (32, 96)
    y = fused_lora_linear(x, W, b, packed, backend=backend)
    torch.testing.assert_close(y, fused_lora_linear(x, W, b, loras, backend=backend), rtol=0, atol=0)
    x_t = x.t().contiguous().t()  # same values, column-major
    W_nc = torch.cat([W, W], dim=1)[:, ::2]  # strided view with stride(1) == 2
    W_nc.copy_(W)
    assert not x_t.is_contiguous() and not W_nc.is_contiguous()
    torch.testing.assert_close(fused_lora_linear(x_t, W_nc, b, packed, backend=backend), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_as_tensor_and_empty_input(backend):
    x, W, b, loras = make_layer(41, 72, 80, (4, 8), (1.0, 1.0))
    loras_t = [(A, B, torch.tensor(-0.5)) for A, B, _ in loras]
    y = fused_lora_linear(x, W, b, loras_t, backend=backend)
    assert_close_rel(y, formula64(x, W, b, [(A, B, -0.5) for A, B, _ in loras]), torch.float32)
    empty = fused_lora_linear(x[:0], W, b, loras, backend=backend)
    assert empty.shape == (0, 80)
    y0, st = fused_lora_linear(x.reshape(1, 41, 72)[:, :0], W, b, loras, stats=True, backend=backend)
    assert y0.shape == (1, 0, 80) and st.kl.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_token_samples_with_per_sample_gates(backend):
    """(batch, 0, K) inputs with (batch, L) gates: empty outputs and statistics, and the fix-up is a no-op."""
    x, W, b, loras = make_layer(None, 72, 80, (4, 13), (1.0, -0.5), lead=(3, 0))
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], device=DEVICE)
    assert fused_lora_linear(x, W, b, loras, gates, backend=backend).shape == (3, 0, 80)
    out = fused_lora_forward(x, W, b, loras, gates, stats=True, backend=backend)
    assert out.y.shape == (3, 0, 80)
    lora_fixup(out.y, out.u if out.u is not None else torch.zeros(0, 32), out.packed, -gates, out.rows_per_sample,
               backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_and_gates(backend):
    """A bias and gates that are strided views (stride 2) are read through their strides."""
    x, W, b, loras = make_layer(None, 72, 80, (4, 13), (1.0, -0.5), lead=(3, 5))
    b_view = torch.stack([b, torch.full_like(b, 1e3)], dim=1)[:, 0]  # stride 2, garbage in between
    g = torch.tensor([[0.3, 9.0, -1.0, 9.0], [1.0, 9.0, 0.0, 9.0], [0.0, 9.0, 2.0, 9.0]], device=DEVICE)[:, ::2]
    assert b_view.stride() == (2,) and g.stride() == (4, 2)
    y = fused_lora_linear(x, W, b_view, loras, g, backend=backend)
    assert_close_rel(y, formula64(x, W, b, loras, g.contiguous()), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_lora_behind_zero_gate_follows_the_formula(backend):
    """One NaN semantics on both backends, the formula's: 0 * NaN = NaN, so a NaN in a LoRA gated to 0
    reaches y (the torch path skips zero-gated LoRAs only when every factor is finite)."""
    x, W, b, loras = make_layer(9, 32, 24, (4, 8), (1.0, 1.0))
    loras[1][1][5, 2] = float("nan")  # B of LoRA 1, output channel 5
    gates = torch.tensor([1.0, 0.0], device=DEVICE)
    y = fused_lora_linear(x, W, b, loras, gates, backend=backend)
    ref = formula64(x, W, b, loras, gates)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(ref)) and torch.isnan(ref[:, 5]).all()
    assert torch.isfinite(ref[:, :5]).all()
    clean = [loras[0], (loras[1][0], torch.zeros_like(loras[1][1]), 1.0)]
    torch.testing.assert_close(y[:, :5], fused_lora_linear(x, W, b, clean, gates, backend=backend)[:, :5])


# ---------------------------------------------------------------- statistics


def stats64(x, W, b, loras):
    """Per-row KL(p0 || p_i), KL(p_i || p0) and ||d_i||^2 in fp64 from the definitions."""
    x64 = x.double().cpu().reshape(-1, x.shape[-1])
    f0 = x64 @ W.double().cpu().t() + (b.double().cpu() if b is not None else 0)
    logp0 = torch.log_softmax(f0, dim=1)
    kl, klr, en = [], [], []
    for A, B, s in loras:
        d = float(s) * (x64 @ A.double().cpu().t()) @ B.double().cpu().t()
        logpi = torch.log_softmax(f0 + d, dim=1)
        kl.append((logp0.exp() * (logp0 - logpi)).sum(1))
        klr.append((logpi.exp() * (logpi - logp0)).sum(1))
        en.append((d * d).sum(1))
    return torch.stack(kl, 1), torch.stack(klr, 1), torch.stack(en, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(77, 96, 200, (4, 13)), (41, 72, 80, (8, 64)), (1, 96, 130, (13,))])
def test_statistics_match_fp64_definitions(case, dtype, backend):
    M, K, N, ranks = case
    # wide logits (std ~3) make softmax peaked enough for the test to notice a wrong merge
    x, W, b, loras = make_layer(M, K, N, ranks, [1.0, -0.5][: len(ranks)], dtype=dtype)
    W = (W.float() * 3).to(dtype)
    gates = torch.tensor([0.0, 1.0][: len(ranks)], device=DEVICE)
    y, st = fused_lora_linear(x, W, b, loras, gates, stats=True, backend=backend)
    assert isinstance(st, LoRAStats) and st["kl"] is st.kl
    assert_close_rel(y, formula64(x, W, b, loras, gates), dtype)
    kl, klr, en = stats64(x, W, b, loras)
    assert st.kl.dtype == torch.float32 and st.kl.shape == (M, len(ranks))
    # 16-bit runs round the delta's operands (U, B) to the activation dtype inside the epilogue
    rtol = 1e-4 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(st.energy.double().cpu(), en, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(st.kl.double().cpu(), kl, rtol=10 * rtol, atol=2e-6)
    torch.testing.assert_close(st.kl_reverse.double().cpu(), klr, rtol=10 * rtol, atol=2e-6)
    assert (st.kl > -1e-5).all()


def test_triton_stats_partials_merge_like_reference():
    """The Triton reduce over several N-tiles equals the torch merge of the same partials."""
    x, W, b, loras = make_layer(77, 64, 200, (8, 4), (1.0, 1.0))
    out = fused_lora_forward(x, W, b, loras, stats=True, backend="triton")
    assert out.partials.shape[0] == 4  # 200 columns in 64-wide tiles
    from lorafuse.kernels import reduce_lora_stats

    tri = reduce_lora_stats(out.partials, 2, backend="triton")
    ref = reduce_lora_stats_torch(out.partials.double(), 2)
    for name in LoRAStats._fields:
        torch.testing.assert_close(getattr(tri, name).double(), getattr(ref, name), rtol=1e-5, atol=1e-6)


def test_reference_stats_are_exact_in_fp64():
    x, W, b, loras = make_layer(41, 72, 80, (4, 13), (1.0, -0.5))
    args = [t.double() for t in (x, W, b)]
    packed = PackedLoRA.pack(loras, dtype=torch.float64)
    u = lora_shrink_torch(args[0], packed.a)
    _, part = fused_gemm_expand_torch(*args, u, packed.b, None, 41, 2, stats=True)
    st = reduce_lora_stats_torch(part, 2)
    kl, klr, en = stats64(x, W, b, loras)
    torch.testing.assert_close(st.kl, kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.kl_reverse, klr, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.energy, en, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- shrink and fix-up


@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink(backend):
    x, _, _, loras = make_layer(77, 96, 80, (4, 13), (2.0, 1.0))
    u = lora_shrink(x, loras, backend=backend)
    assert u.dtype == torch.float32 and u.shape == (77, 32)
    ref = x.double() @ torch.cat([loras[0][0], torch.zeros(12, 96), loras[1][0], torch.zeros(3, 96)]).double().t()
    torch.testing.assert_close(u.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixup_turns_old_gates_into_new(backend):
    x, W, b, loras = make_layer(None, 72, 80, (8, 13), (1.0, -0.5), lead=(4, 10))
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # samples 1 and 2 flip
    out = fused_lora_forward(x, W, b, loras, old, stats=True, backend=backend)
    before = out.y.clone()
    lora_fixup(out.y, out.u, out.packed, new - old, out.rows_per_sample, backend=backend)
    assert_close_rel(out.y, formula64(x, W, b, loras, new), torch.float32)
    # rows of samples that did not flip are untouched, bit for bit
    assert torch.equal(out.y[0], before[0]) and torch.equal(out.y[3], before[3])


# ---------------------------------------------------------------- errors


def _bad_calls():
    x, W, b, loras = make_layer(8, 32, 24, (4, 8), (1.0, 1.0))
    (A0, B0, _), (A1, B1, _) = loras
    yield "input features", lambda: fused_lora_linear(torch.randn(8, 31), W, b, loras)
    yield "input features", lambda: fused_lora_linear(x, W, b, [(torch.randn(4, 31), B0, 1.0)])
    yield "output features", lambda: fused_lora_linear(x, W, b, [(A0, torch.randn(25, 4), 1.0)])
    yield "rank mismatch", lambda: fused_lora_linear(x, W, b, [(A0, B1, 1.0)])
    yield "bias", lambda: fused_lora_linear(x, W, torch.randn(23), loras)
    yield "gates", lambda: fused_lora_linear(x, W, b, loras, torch.ones(3))
    yield "per-sample gates", lambda: fused_lora_linear(x, W, b, loras, torch.ones(7, 2))
    yield "dtype", lambda: fused_lora_linear(x.double(), W.double(), None, loras)
    yield "dtype", lambda: fused_lora_linear(x.to(torch.int32), W, b, loras)
    yield "weight is torch.float16", lambda: fused_lora_linear(x, W.half(), b, loras)
    yield "not finite", lambda: fused_lora_linear(x, W, b, [(A0, B0, float("nan"))])
    yield "not finite", lambda: fused_lora_linear(x, W, b, [(A0, B0, torch.tensor(float("inf")))])
    yield "backend", lambda: fused_lora_linear(x, W, b, loras, backend="cuda")
    yield "non-empty sequence", lambda: fused_lora_linear(x, W, b, [])
    yield "(A, B, scale)", lambda: fused_lora_linear(x, W, b, [(A0, B0)])
    yield "packed LoRAs are torch.float16", lambda: fused_lora_linear(x, W, b, PackedLoRA.pack(loras, dtype=torch.half))
    yield "meta", lambda: fused_lora_linear(x, W.to("meta"), b, loras)
    yield "gates is on meta", lambda: fused_lora_linear(x, W, b, loras, torch.ones(2, device="meta"))
    yield "K=0", lambda: fused_lora_linear(x[:, :0], W[:, :0], b, [(A0[:, :0], B0, 1.0)], stats=True)
    yield "N=0", lambda: fused_lora_linear(x, W[:0], None, [(A0, B0[:0], 1.0)], stats=True)
    yield "single (A, B, scale) triple", lambda: fused_lora_linear(x, W, b, (A0, B0, 1.0))
    yield "single (A, B, scale) triple", lambda: PackedLoRA.pack([A0, B0, 0.5])


@pytest.mark.parametrize("expected,call", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_clear_errors(expected, call):
    with pytest.raises((ValueError, TypeError), match=None) as info:
        call()
    assert expected in str(info.value), str(info.value)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, W, b, loras = make_layer(4, 32, 24, (4,), (1.0,), device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_lora_linear(x, W, b, loras, backend="triton")


# ---------------------------------------------------------------- real-GPU compilation and GPU-only checks


def test_kernels_compile_for_sm80_and_sm90(compile_report):
    """Every kernel variant compiles for real targets (see the compile_report fixture)."""
    proc_stdout = compile_report
    assert proc_stdout.count("ok   sm_") >= 70
    for arch in (80, 90):  # every rank class of the expand kernels (slice width x slices), up to rank 512
        for layout in ("slices 16x(3, 3)", "slices 32x(3, 3)", "slices 16x(1, 13)", "slices 64x(8, 8)"):
            assert f"ok   sm_{arch} fused_lora_linear fp16 ranks=" in proc_stdout
            assert any(line.startswith(f"ok   sm_{arch}") and layout in line for line in proc_stdout.splitlines()), (
                arch, layout)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision(dtype):
    for M, K, N, ranks, scales in CASES:
        x, W, b, loras = make_layer(M, K, N, ranks, scales, dtype=dtype)
        gates = torch.ones(len(ranks), device=DEVICE)
        y, st = fused_lora_linear(x, W, b, loras, gates, stats=True, backend="triton")
        assert_close_rel(y, formula64(x, W, b, loras), dtype)
        kl, _, en = stats64(x, W, b, loras)
        torch.testing.assert_close(st.energy.double().cpu(), en, rtol=3e-2, atol=1e-4)
        torch.testing.assert_close(st.kl.double().cpu(), kl, rtol=1e-1, atol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_and_compile():
    x, W, b, loras = make_layer(256, 640, 640, (8, 8), (1.0, 1.0), dtype=torch.float16)
    packed = PackedLoRA.pack(loras, dtype=torch.float16)
    gates = torch.tensor([1.0, 0.0], device="cuda")
    ref = fused_lora_linear(x, W, b, packed, gates)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_lora_linear(x, W, b, packed, gates)
    gates.copy_(torch.tensor([0.0, 1.0]))
    graph.replay()
    torch.testing.assert_close(out, fused_lora_linear(x, W, b, packed, gates))
    assert not torch.equal(out, ref)
    compiled = torch.compile(lambda x_: fused_lora_linear(x_, W, b, packed, gates), fullgraph=True)
    torch.testing.assert_close(compiled(x), fused_lora_linear(x, W, b, packed, gates))


@pytest.mark.gpu
def test_registered_ops_pass_opcheck():
    """torch.library ops: schema (declared mutations) and fake-tensor shape propagation hold."""
    from torch.library import opcheck

    x, W, b, loras = make_layer(41, 72, 80, (4, 8), (1.0, 1.0))
    p = PackedLoRA.pack(loras)
    g = torch.tensor([[1.0, 0.0]], device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    for stats in (False, True):
        args = (x, W, b, p.a, p.b, g, 41, list(p.ranks), stats)
        assert set(opcheck(torch.ops.lorafuse.fused_lora_linear.default, args, test_utils=checks).values()) == {"SUCCESS"}
    # the backward is registered: autograd sees it for inputs that require grad
    grad_args = (x.requires_grad_(), W, b, p.a, p.b, g, 41, list(p.ranks), False)
    res = opcheck(torch.ops.lorafuse.fused_lora_linear.default, grad_args, test_utils=("test_autograd_registration",))
    assert set(res.values()) == {"SUCCESS"}
    x = x.detach()
    y, u, _ = torch.ops.lorafuse.fused_lora_linear(x, W, b, p.a, p.b, g, 41, list(p.ranks), True)
    args = (y, u, p.b, torch.tensor([[-1.0, 1.0]], device=DEVICE), 41, list(p.ranks))
    assert set(opcheck(torch.ops.lorafuse.lora_fixup.default, args, test_utils=checks).values()) == {"SUCCESS"}
