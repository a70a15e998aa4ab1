"""kl_decide (statistics partials -> per-sample gates, in place) and kl_select (one KL layer call)
against the fp64 decision reference of tests/fusion/reference.py:

    k_i,m = KL(softmax(f0_m) || softmax(f0_m + d_i,m)) (forward) or KL(p_i || p0) (reverse),
    D_i,g = mean over sample g's rows ("sample") or over all rows ("batch"),
    subject iff D_c > D_s, ties by the tie rule.

Partials are built per N-tile from the fp64 epilogue reference on column slices (ragged last tile),
so the kernel's online-softmax merge over tiles is exercised; decisions are asserted where the
reference is clear-cut (every case has both kinds and a wide margin by construction)."""

import itertools

import pytest
import torch

from lorafuse.kernels import PackedLoRA, kl_decide, kl_select
from lorafuse.kernels.fused_lora_linear import fused_gemm_expand_torch
from lorafuse.kernels.kl_decide import kl_decide_torch, kl_select_plain

from ..conftest import DEVICE
from ..fusion.reference import formula64, kl_decide64, kl_divergences64
from .conftest import compiled

BACKENDS = ["torch", "triton"]
OPTIONS = list(itertools.product(("forward", "reverse"), ("sample", "batch"), ("subject", "style")))
# (G samples, rows per sample): 41 / 77 rows, one row per sample, one sample, G = 1..3
SHAPES = [(41, 1), (7, 11), (1, 41), (2, 20), (3, 13)]
KL_RTOL = 2e-3  # fp32 statistics vs fp64
TILE = 16


def make_case(G, rows, *, N=40, K=24, ranks=(4, 13), scales=(1.0, -0.8), seed=0, zero=()):
    """x (G, rows, K) whose samples alternate between pushing the subject's and the style's delta
    (rows along that LoRA's A, orthogonal to the other's), W (N, K), b (N,), loras [(A, B, s)] * 2;
    LoRAs listed in ``zero`` are all zeros."""
    g = torch.Generator().manual_seed(seed)
    loras = []
    for i, (r, s) in enumerate(zip(ranks, scales)):
        A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) / r**0.5
        loras.append((A * 0 if i in zero else A, B * 0 if i in zero else B, s))
    W, b = 2 * torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    xs = []
    for s in range(G):
        own, other = loras[s % 2], loras[1 - s % 2]
        x = 0.15 * torch.randn(rows, K, generator=g)
        if own[0].abs().sum() > 0:
            Q = torch.linalg.qr(other[0].t()).Q if other[0].abs().sum() > 0 else torch.zeros(K, 1)
            push = torch.randn(rows, own[0].shape[0], generator=g) @ own[0]
            push = push - (push @ Q) @ Q.t()
            x = x + (2.0 + s % 3) * push / push.norm(dim=1, keepdim=True)
        xs.append(x)
    return torch.stack(xs), W, b, loras


def tile_partials(x, W, b, loras, dtype=torch.float32):
    """(T, M, 12) partials, one slab per TILE output columns (the fused kernel's layout), from the
    fp64 epilogue reference."""
    p = PackedLoRA.pack(loras, dtype=torch.float64)
    x2 = x.reshape(-1, x.shape[-1]).double()
    u = x2 @ p.a.t()
    slabs = []
    for n0 in range(0, W.shape[0], TILE):
        cols = slice(n0, n0 + TILE)
        _, part = fused_gemm_expand_torch(x2, W[cols].double(), b[cols].double(), u, p.b[cols], None, 1, 2, True)
        slabs.append(part[0])
    return torch.stack(slabs).to(DEVICE, dtype)


def check_against_reference(new, D, delta, old, x, W, b, loras, direction, reduction, tie):
    D64 = kl_divergences64(x, W, b, loras, direction, reduction)
    want = kl_decide64(D64, tie)
    onehot = torch.tensor([[1.0, 0.0] if s else [0.0, 1.0] for s in want])
    assert new.shape == D.shape == delta.shape == (x.shape[0], 2)
    assert new.dtype == D.dtype == delta.dtype == torch.float32
    assert torch.equal(new.cpu(), onehot), (new.tolist(), want, D64.tolist())
    assert torch.equal(delta.cpu(), onehot - old)
    torch.testing.assert_close(D.double().cpu(), D64, rtol=KL_RTOL, atol=1e-7)
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,rows", SHAPES, ids=[f"G{g}x{r}" for g, r in SHAPES])
@pytest.mark.parametrize("direction,reduction,tie", OPTIONS, ids=["-".join(o) for o in OPTIONS])
def test_kl_decide_matches_fp64_reference(direction, reduction, tie, G, rows, backend):
    if backend == "triton" and DEVICE == "cpu" and G == 41 and (direction, tie) != ("forward", "subject"):
        pytest.skip("41 interpreted programs per call: one option pair is enough on the CPU")
    x, W, b, loras = make_case(G, rows, seed=G * 100 + rows)
    D64 = kl_divergences64(x, W, b, loras, direction, reduction)
    gap = (D64[:, 0] - D64[:, 1]).abs() / D64.abs().amax(1)
    assert (gap > 0.05).all(), f"ill-posed case {D64.tolist()}"  # the case is clear-cut
    if reduction == "sample" and G > 1:
        assert set(kl_decide64(D64)) == {True, False}
    part = tile_partials(x, W, b, loras)
    assert part.shape == (3, G * rows, 12)  # 40 columns: two full tiles and a ragged one
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]] * G)[:G].contiguous()
    gates = old.clone().to(DEVICE)
    keep = gates.data_ptr()
    new, D, delta = kl_decide(part, gates, rows, direction=direction, reduction=reduction, tie=tie, backend=backend)
    check_against_reference(new, D, delta, old, x, W, b, loras, direction, reduction, tie)
    assert gates.data_ptr() == keep and torch.equal(gates, new)  # the state is updated in place
    assert new.data_ptr() != gates.data_ptr()  # and the returned gates are a new tensor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_decide_ties_and_zero_loras(direction, backend):
    """Zero LoRAs have KL exactly 0: two of them tie (the tie rule decides), one loses to any other."""
    for zero, by_tie in (((0, 1), {"subject": True, "style": False}), ((0,), {"subject": False, "style": False}),
                         ((1,), {"subject": True, "style": True})):
        x, W, b, loras = make_case(3, 5, zero=zero, seed=1)
        part = tile_partials(x, W, b, loras)
        for tie, reduction in itertools.product(("subject", "style"), ("sample", "batch")):
            gates = torch.tensor([[0.0, 1.0]] * 3, device=DEVICE)
            new, D, delta = kl_decide(part, gates, 5, direction=direction, reduction=reduction, tie=tie,
                                      backend=backend)
            want = [1.0, 0.0] if by_tie[tie] else [0.0, 1.0]
            assert new.tolist() == [want] * 3, (zero, tie, reduction)
            assert delta.tolist() == [[want[0], want[1] - 1.0]] * 3
            for i in zero:
                assert (D[:, i] == 0).all()
            assert (D >= 0).all()


def test_kernel_equals_reference_implementation():
    """Same signature, same results: the Triton kernel vs kl_decide_torch on fp32 partials."""
    from lorafuse.kernels.kl_decide import kl_decide_triton

    x, W, b, loras = make_case(3, 13, seed=3)
    part = tile_partials(x, W, b, loras)
    for forward, batch, tie_subject in itertools.product((True, False), repeat=3):
        g1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], device=DEVICE)
        g2 = g1.clone()
        out1 = kl_decide_torch(part, g1, 13, forward, batch, tie_subject)
        out2 = kl_decide_triton(part, g2, 13, forward, batch, tie_subject)
        assert torch.equal(out1[0], out2[0]) and torch.equal(out1[2], out2[2]) and torch.equal(g1, g2)
        torch.testing.assert_close(out1[1], out2[1], rtol=1e-5, atol=1e-8)


def _bad_calls():
    part = torch.zeros(2, 6, 12, device=DEVICE)
    gates = torch.zeros(2, 2, device=DEVICE)
    return [
        (dict(partials=part[..., :11], gates=gates, rows_per_sample=3), r"partials must be fp32 \(tiles, rows, 12\)"),
        (dict(partials=part.double(), gates=gates, rows_per_sample=3), "partials must be fp32"),
        (dict(partials=part, gates=gates.t(), rows_per_sample=3), r"gates must be a contiguous fp32 \(batch, 2\)"),
        (dict(partials=part, gates=gates[:, :1], rows_per_sample=3), "gates must be"),
        (dict(partials=part, gates=gates, rows_per_sample=2), "gates have 2 samples of rows_per_sample=2 rows but "
                                                              "the partials have 6 rows"),
        (dict(partials=part, gates=gates, rows_per_sample=3, direction="up"), "direction must be one of"),
        (dict(partials=part, gates=gates, rows_per_sample=3, reduction="token"), "reduction must be one of"),
        (dict(partials=part, gates=gates, rows_per_sample=3, tie="coin"), "tie must be one of"),
    ]


@pytest.mark.parametrize("kwargs,match", _bad_calls(), ids=[m[:24] for _, m in _bad_calls()])
def test_kl_decide_bad_calls_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=rf"kl_decide: {match}"):
        kl_decide(**kwargs)


def test_kl_decide_op_passes_opcheck():
    from torch.library import opcheck

    x, W, b, loras = make_case(2, 7, seed=5)
    part = tile_partials(x, W, b, loras)
    args = (part, torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE), 7, True, False, True)
    checks = ("test_schema", "test_faketensor")
    assert set(opcheck(torch.ops.lorafuse.kl_decide.default, args, test_utils=checks).values()) == {"SUCCESS"}


# ---------------------------------------------------------------- kl_select: one layer call

SELECT = [  # (G, rows, bias, scales, dtype): 41 / 77 rows, 1-row samples, scale 0 and negative
    (1, 41, True, (1.0, -0.8), torch.float32),
    (7, 11, False, (0.7, 1.6), torch.float32),
    (3, 13, True, (0.0, 1.3), torch.float32),
    (41, 1, True, (-1.2, 0.9), torch.float32),
    (2, 9, True, (1.0, -0.8), torch.float16),
]
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,rows,bias,scales,dtype", SELECT, ids=[f"G{c[0]}x{c[1]}-{c[4]}" for c in SELECT])
def test_kl_select_matches_fp64_formula(G, rows, bias, scales, dtype, backend):
    if dtype == torch.float16 and backend == "triton" and DEVICE == "cpu":
        pytest.skip("fp16 through the interpreter is covered by tests/fusion/test_kl.py")
    x, W, b, loras = make_case(G, rows, scales=scales, seed=G + rows)
    b = b if bias else None
    packed = PackedLoRA.pack(loras, dtype=dtype, device=DEVICE)
    few = dtype != torch.float32 or (backend == "triton" and DEVICE == "cpu" and G > 8)  # interpreter time
    for direction, reduction, tie in OPTIONS[:1] if few else OPTIONS:
        D64 = kl_divergences64(x, W, b, loras, direction, reduction)
        if not torch.equal(D64[:, 0], D64[:, 1]):
            assert ((D64[:, 0] - D64[:, 1]).abs() / D64.abs().amax(1) > 0.05).all(), D64.tolist()
        want = torch.tensor([[1.0, 0.0] if s else [0.0, 1.0] for s in kl_decide64(D64, tie)])
        state = torch.tensor([[0.0, 1.0]] * G, device=DEVICE)
        xd = x.to(DEVICE, dtype)
        y, gates, D = kl_select(xd, W.to(DEVICE, dtype), None if b is None else b.to(DEVICE, dtype), packed, state,
                                direction=direction, reduction=reduction, tie=tie, backend=backend)
        assert y.shape == (G, rows, W.shape[0]) and y.dtype == dtype
        assert torch.equal(gates.cpu(), want), (direction, reduction, tie, gates.tolist(), D64.tolist())
        torch.testing.assert_close(D.double().cpu(), D64, rtol=KL_RTOL if dtype == torch.float32 else 3e-2, atol=1e-6)
        ref = formula64(xd, W.to(dtype), b if b is None else b.to(dtype), [(A.to(dtype), B.to(dtype), s)
                                                                          for A, B, s in loras], want)
        err = (y.double().cpu() - ref).norm() / ref.norm()
        assert err < REL_TOL[dtype], f"{direction}/{reduction}/{tie}: relative error {err:.2e}"
        if backend == "triton":  # the speculative state now holds the decision
            assert torch.equal(state.cpu(), want)


def test_kl_select_torch_path_is_stateless_and_fresh():
    """The torch path decides before it computes y: the previous gates do not matter (bit-exact), and
    its gates / divergences are new tensors each call (a log may keep them)."""
    x, W, b, loras = make_case(3, 13, seed=8)
    packed = PackedLoRA.pack(loras)
    outs = [kl_select(x, W, b, packed, torch.tensor([g] * 3), backend="torch") for g in ([1.0, 0.0], [0.0, 1.0])]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert outs[0][1].data_ptr() != outs[1][1].data_ptr() and outs[0][2].data_ptr() != outs[1][2].data_ptr()


def test_kl_decide_kernel_compiles_for_sm80_and_sm90(compile_report):
    """compile_check lists the decision kernel (every direction / reduction / tie variant) and each
    compiles for sm_80 and sm_90 without register spills."""
    ok = compiled(compile_report, "kl_decide")
    assert len(ok) == 16 and all("STACK:0" in line for line in ok if "STACK:" in line), ok


def test_kl_select_bad_calls_raise_clear_errors():
    x, W, b, loras = make_case(2, 3, seed=9)
    packed = PackedLoRA.pack(loras)
    state = torch.tensor([[1.0, 0.0]] * 2)
    with pytest.raises(ValueError, match=r"kl_select: state must be contiguous fp32 \(2, 2\) for x of shape"):
        kl_select(x, W, b, packed, state[:1])
    with pytest.raises(ValueError, match="kl_select: packed must be a PackedLoRA of two LoRAs"):
        kl_select(x, W, b, PackedLoRA.pack(loras + loras[:1]), state)
    with pytest.raises(ValueError, match="kl_select: tie must be one of"):
        kl_select(x, W, b, packed, state, tie="coin")
    with pytest.raises(ValueError, match=r"x has 24 input features \(last dim\) but weight is"):
        kl_select(x, W[:, :20], b, packed, state, backend="torch")


def test_kl_select_plain_takes_plain_calls_only():
    """kl_select_plain, the host-cheap entry of the torch path (KLDynamic.layer_forward on a CPU),
    gives kl_select's results bit for bit on plain calls and declines (None) every call that
    kl_select must check or route elsewhere."""
    x, W, b, loras = make_case(3, 13, seed=8)
    packed = PackedLoRA.pack(loras)
    for flags, (direction, reduction, tie) in zip(itertools.product((True, False), repeat=3),
                                                  itertools.product(("forward", "reverse"), ("batch", "sample"),
                                                                    ("subject", "style"))):
        got = kl_select_plain(x, W, b, packed, *flags)
        want = kl_select(x, W, b, packed, torch.zeros(3, 2), direction=direction, reduction=reduction, tie=tie,
                         backend="torch")
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (direction, reduction, tie)
    rows = kl_select_plain(x[:, 0], W, None, packed, True, False, True)  # 2-D x: each row its own sample
    assert rows[0].shape == (3, 40) and rows[1].shape == rows[2].shape == (3, 2)
    declined = {
        "x fp16, LoRAs fp32": (x.half(), W, b, packed),
        "weight fp16": (x, W.half(), b, packed),
        "bias fp64": (x, W, b.double(), packed),
        "weight (N, 20)": (x, W[:, :20], b, packed),
        "bias (20,)": (x, W, b[:20], packed),
        "x on meta": (x.to("meta"), W, b, packed),
        "empty x": (x[:0], W, b, packed),
        "three LoRAs": (x, W, b, PackedLoRA.pack(loras + loras[:1])),
        "weight not a tensor": (x, W.tolist(), b, packed),
    }
    for name, args in declined.items():
        assert kl_select_plain(*args, True, False, True) is None, name


@pytest.mark.parametrize("direction,reduction", [("forward", "sample"), ("forward", "batch"), ("reverse", "sample")])
def test_kl_select_torch_differentiates_through_x(direction, reduction):
    """Autograd through x (guidance through the denoiser): the torch path updates no tensor that
    autograd saved, y and D equal the no-grad call bit for bit, and d(|y|^2 + sum D)/dx is the fp64
    formula's at the same gates."""
    x, W, b, loras = make_case(2, 9, seed=4)
    packed = PackedLoRA.pack(loras)
    xg = x.clone().requires_grad_()
    y, gates, D = kl_select(xg, W, b, packed, torch.zeros(2, 2), direction=direction, reduction=reduction,
                            backend="torch")
    (y.square().sum() + D.sum()).backward()
    with torch.no_grad():
        y0, gates0, D0 = kl_select(x, W, b, packed, torch.zeros(2, 2), direction=direction, reduction=reduction,
                                   backend="torch")
    assert torch.equal(y.detach(), y0) and torch.equal(gates, gates0) and torch.equal(D.detach(), D0)
    x64 = x.double().requires_grad_()
    y64 = formula64(x64, W, b, loras, gates)
    D64 = kl_divergences64(x64, W, b, loras, direction, reduction)
    (y64.square().sum() + D64.sum()).backward()
    err = (xg.grad.double() - x64.grad).norm() / x64.grad.norm()
    assert err < 1e-5, err
