"""merge_lora_weight and merge_flipped_weights against the fp64 formula, on both backends (Triton
through the interpreter on a CPU), plus their sm_80 / sm_90 builds.

    W_eff = W + sum_i g_i s_i B_i A_i
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels import PackedLoRA
from lorafuse.kernels._common import interpreter_active
from lorafuse.kernels.merge_weight import MergeTable, merge_flipped_weights, merge_lora_weight

from .conftest import compiled

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_active() and not torch.cuda.is_available(), reason="Triton needs CUDA or TRITON_INTERPRET=1"))]
# relative Frobenius error vs fp64, by weight dtype
REL_TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


def lora(n, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g), torch.randn(n, r, generator=g) / r ** 0.5


def formula64(W, loras, gates):
    out = W.double().clone()
    for (A, B, s), g in zip(loras, gates):
        out += float(g) * s * (B.double() @ A.double())
    return out


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# odd: N, K not multiples of the tile, ranks not multiples of 16 and unequal, scale 0 / negative
CASES = [
    (77, 41, (4, 13), (1.0, -0.5), (1.0, 0.0)),
    (33, 70, (1, 20), (0.0, 2.0), (0.3, -2.0)),
    (16, 16, (64, 8), (0.7, 1.3), (0.0, 1.0)),
    (130, 65, (17, 33), (-1.0, 0.25), (0.5, 0.5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,ranks,scales,gates", CASES, ids=[f"N{c[0]}K{c[1]}r{c[2][0]}-{c[2][1]}" for c in CASES])
def test_matches_fp64_formula(backend, dtype, N, K, ranks, scales, gates):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    loras = [(*lora(N, K, r, 10 + i), s) for i, (r, s) in enumerate(zip(ranks, scales))]
    ref = formula64(W, loras, gates)
    packed = PackedLoRA.pack(loras, dtype=torch.float32)
    for g in (torch.tensor(gates), list(gates)):
        out = merge_lora_weight(W, packed, g, backend=backend)
        assert out.dtype == dtype and out.shape == (N, K)
        assert rel(out, ref) < REL_TOL[dtype]
    # in place, and from raw triples (packed in fp32 inside)
    W2 = W.clone()
    assert merge_lora_weight(W2, loras, torch.tensor(gates), out=W2, backend=backend) is W2
    assert rel(W2, ref) < REL_TOL[dtype]
    # one rounding: merging into fp16 equals the fp32 merge of the same values rounded once
    if dtype == torch.float16:
        out32 = merge_lora_weight(W.float(), packed, torch.tensor(gates), backend=backend)
        assert torch.equal(out32.half(), merge_lora_weight(W, packed, torch.tensor(gates), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gates_leave_the_weight_bit_exact(backend):
    W = torch.randn(41, 77).half()
    loras = [(*lora(41, 77, 5, 1), 1.0), (*lora(41, 77, 30, 2), -3.0)]
    assert torch.equal(merge_lora_weight(W, loras, [0.0, 0.0], backend=backend), W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_out(backend):
    base = torch.randn(50, 90)
    W = base.t()[:, ::2]  # (90, 25), non-contiguous
    loras = [(*lora(90, 25, 3, 4), 0.5), (*lora(90, 25, 18, 5), 1.5)]
    out = torch.empty(25, 90).t()  # (90, 25) column-major
    merge_lora_weight(W, loras, [1.0, -1.0], out=out, backend=backend)
    assert rel(out, formula64(W, loras, (1.0, -1.0))) < 1e-6


def _table_layers(dtype, seed=0):
    shapes = [(77, 41, (4, 13)), (33, 70, (1, 20)), (20, 16, (16, 32))]
    layers = []
    for i, (N, K, ranks) in enumerate(shapes):
        W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed + i)).to(dtype)
        loras = [(*lora(N, K, r, 100 * i + j), 0.5 + j) for j, r in enumerate(ranks)]
        layers.append((W, PackedLoRA.pack(loras, dtype=torch.float32)))
    return layers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_flipped_rebuilds_exactly_the_flipped_layers(backend, dtype):
    layers = _table_layers(dtype)
    table = MergeTable(len(layers), 2, "cpu")
    dsts = [torch.full_like(W, float("nan")) for W, _ in layers]  # poison: every rebuilt element is written
    for i, ((W, packed), dst) in enumerate(zip(layers, dsts)):
        table.set(i, W, dst, packed)
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    applied = torch.full((3, 2), float("nan"))
    merge_flipped_weights(table, gates, applied, backend=backend)
    assert torch.equal(applied, gates)
    for (W, packed), dst, g in zip(layers, dsts, gates):
        assert torch.equal(dst, merge_lora_weight(W, packed, g, backend=backend))
    # flip layer 1 only; disable layer 2 (its gates change too, but it is left alone)
    before = [d.clone() for d in dsts]
    table.disable(2)
    gates[1] = torch.tensor([1.0, 0.0])
    gates[2] = torch.tensor([0.0, 0.0])
    merge_flipped_weights(table, gates, applied, backend=backend)
    assert torch.equal(dsts[0], before[0]) and torch.equal(dsts[2], before[2])
    assert torch.equal(dsts[1], merge_lora_weight(layers[1][0], layers[1][1], gates[1], backend=backend))
    assert torch.equal(applied, gates)
    # nothing changed: nothing written
    dsts[0].fill_(7.0)
    merge_flipped_weights(table, gates, applied, backend=backend)
    assert (dsts[0] == 7.0).all()


def test_grouped_triton_equals_torch_reference():
    if not interpreter_active() and not torch.cuda.is_available():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    layers = _table_layers(torch.float32, seed=7)
    outs = {}
    for backend in ("torch", "triton"):
        table = MergeTable(len(layers), 2, "cpu")
        dsts = [torch.empty_like(W) for W, _ in layers]
        for i, ((W, packed), dst) in enumerate(zip(layers, dsts)):
            table.set(i, W, dst, packed)
        merge_flipped_weights(table, torch.tensor([[1.0, -0.5], [0.0, 2.0], [0.25, 1.0]]),
                              torch.full((3, 2), float("nan")), backend=backend)
        outs[backend] = dsts
    for a, b in zip(outs["torch"], outs["triton"]):
        assert rel(b, a.double()) < 1e-6


def test_errors():
    W = torch.randn(8, 6)
    loras = [(*lora(8, 6, 2, 0), 1.0), (*lora(8, 6, 3, 1), 1.0)]
    with pytest.raises(ValueError, match="2-D"):
        merge_lora_weight(W[0], loras, [1.0, 0.0])
    with pytest.raises(ValueError, match=r"target \(8 x 6\) but the weight is \(6, 8\)"):
        merge_lora_weight(W.t(), loras, [1.0, 0.0])
    with pytest.raises(ValueError, match=r"gates must have shape \(2,\)"):
        merge_lora_weight(W, loras, torch.ones(3))
    with pytest.raises(TypeError, match="sequence of 2 floats"):
        merge_lora_weight(W, loras, [1.0])
    with pytest.raises(ValueError, match="out must be"):
        merge_lora_weight(W, loras, [1.0, 0.0], out=torch.empty(6, 8))
    with pytest.raises(TypeError, match="int64"):
        merge_lora_weight(W.long(), loras, [1.0, 0.0])
    with pytest.raises(ValueError, match="backend must be one of"):
        merge_lora_weight(W, loras, [1.0, 0.0], backend="cuda")
    table = MergeTable(2, 2, "cpu")
    packed = PackedLoRA.pack(loras, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not fit the table"):
        table.set(0, W.t().contiguous().t(), W.clone(), packed)  # non-contiguous source
    with pytest.raises(ValueError, match=r"gates must be \(2, 2\) float32"):
        merge_flipped_weights(table, torch.zeros(3, 2), torch.zeros(2, 2))


def test_compile_check_builds_the_merge_kernels_for_sm80_and_sm90(compile_report):
    ok = compiled(compile_report, "merge")
    assert len(ok) == 2 * 2 * 3, ok  # 2 archs x (single, grouped) x 3 dtypes
