"""Seeded fuzz of the public ``fused_lora_linear`` on both backends (Triton through the interpreter on a
CPU) against the fp64 formula

    y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T        (IEEE: 0 * NaN = NaN, on both backends)

Every rank class the kernels distinguish (rank slices of 16, 32 and 64 columns, one and many slices,
unequal ranks, up to 512), strided views of every tensor argument, zero-token samples with per-sample
gates, NaN / inf placed in x, W, bias, A or B (also in a LoRA gated to 0), fp32 and fp16. Small K/N and
few rows keep the interpreter fast (the whole file runs in well under a minute on a CPU).
"""

import random

import pytest
import torch

from lorafuse.kernels import fused_lora_linear

from ..conftest import DEVICE
from .test_fused_lora_linear import formula64, stats64

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN input
BACKENDS = ["triton", "torch"]
RANK_CLASSES = (1, 7, 16, 17, 33, 48, 64, 65, 96, 100, 128, 200)
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}
SEED = 12
# where a NaN (inf for x_inf) goes; *_off: into a LoRA whose gate is 0 (0 * NaN = NaN on both backends)
NAN_PLACES = (None, "x", "A_off", None, "W", "B_off", "bias", "A", None, "B", "x_inf")


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout: 'step' (every other element of a wider
    buffer along the last dim), 't' (column-major storage), or unchanged ('contig')."""
    if how == "contig" or t.dim() == 0:
        return t
    if how == "t" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _cases():
    rng = random.Random(SEED)
    cases = []
    for i, r in enumerate(RANK_CLASSES):
        for variant in range(2):
            dtype = torch.float32 if variant == 0 else torch.float16
            ranks = (r,) if (i + variant) % 4 == 3 else (r, rng.choice(RANK_CLASSES))
            lead = rng.choice([(rng.randint(1, 21),), (rng.randint(1, 3), rng.randint(1, 9))])
            gate_kind = rng.choice(["none", "layer", "sample"])
            if variant == 1 and i % 3 == 0:  # zero-token samples: (batch, 0, K) with per-sample gates
                lead, gate_kind = (rng.randint(1, 3), 0), "sample"
            if gate_kind == "sample" and len(lead) == 1:
                lead = (lead[0], 1)
            nan = NAN_PLACES[(2 * i + variant) % len(NAN_PLACES)]
            cases.append(dict(
                ranks=ranks, lead=lead, K=rng.choice([16, 19, 24, 33]), N=rng.choice([8, 13, 24, 40]),
                scales=tuple(rng.choice([1.0, -0.5, 0.0, 2.0]) for _ in ranks), dtype=dtype, gate_kind=gate_kind,
                bias=rng.random() < 0.7, layout={k: rng.choice(["contig", "step", "t"])
                                                 for k in ("x", "W", "bias", "A", "B", "gates")},
                nan=nan if gate_kind != "none" or not nan or not nan.endswith("_off") else nan[0],
                stats=dtype == torch.float32 and nan is None,
            ))
    return cases


CASES = _cases()


def _case_id(c):
    return (f"r{'-'.join(map(str, c['ranks']))}_{str(c['dtype'])[6:]}_{'x'.join(map(str, c['lead']))}"
            f"_{c['gate_kind']}{'_' + c['nan'] if c['nan'] else ''}{'_stats' if c['stats'] else ''}")


def _build(c, seed):
    g = torch.Generator().manual_seed(seed)
    K, N, dtype = c["K"], c["N"], c["dtype"]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(DEVICE, dtype)

    x = rnd(*c["lead"], K)
    W = rnd(N, K, std=K**-0.5)
    b = rnd(N, std=0.5) if c["bias"] else None
    loras = [(rnd(r, K, std=K**-0.5), rnd(N, r, std=r**-0.5), s) for r, s in zip(c["ranks"], c["scales"])]
    L = len(loras)
    gates = None
    if c["gate_kind"] == "layer":
        gates = torch.tensor([[1.0, 0.0, -0.7, 0.4][(seed + i) % 4] for i in range(L)], device=DEVICE)
    elif c["gate_kind"] == "sample":
        table = [[1.0, 0.0], [0.0, 1.0], [0.3, -2.0]]
        rows = [[table[s % 3][i % 2] for i in range(L)] for s in range(c["lead"][0])]
        gates = torch.tensor(rows, device=DEVICE).reshape(c["lead"][0], L)
    nan = c["nan"]
    if nan:
        bad = float("inf") if nan == "x_inf" else float("nan")
        off = next((i for i in range(L) if gates is not None and bool((gates[..., i] == 0).all())), 0)
        if nan.startswith("x") and x.numel():
            x.view(-1, K)[x.view(-1, K).shape[0] // 2, K // 3] = bad
        elif nan == "W":
            W[N // 2, K // 2] = bad
        elif nan == "bias" and b is not None:
            b[N - 1] = bad
        elif nan in ("A", "A_off"):
            loras[off if nan == "A_off" else 0][0][0, K - 1] = bad
        elif nan in ("B", "B_off"):
            loras[off if nan == "B_off" else 0][1][1 % N, -1] = bad
    return x, W, b, loras, gates


def _apply_layouts(c, x, W, b, loras, gates):
    lay = c["layout"]
    x_s = _strided(x, lay["x"])
    W_s = _strided(W, lay["W"])
    b_s = _strided(b, lay["bias"] if lay["bias"] != "t" else "step") if b is not None else None
    loras_s = [(_strided(A, lay["A"]), _strided(B, lay["B"]), s) for A, B, s in loras]
    g_s = _strided(gates, lay["gates"]) if gates is not None else None
    return x_s, W_s, b_s, loras_s, g_s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fuzz_public_api_against_fp64(case, backend):
    seed = SEED * 1000 + CASES.index(case)
    x, W, b, loras, gates = _build(case, seed)
    args = _apply_layouts(case, x, W, b, loras, gates)
    if case["layout"]["x"] == "step" and x.numel() > 1:
        assert not args[0].is_contiguous()
    out = fused_lora_linear(*args, stats=case["stats"], backend=backend)
    y, st = out if case["stats"] else (out, None)
    ref = formula64(x, W, b, loras, gates)
    assert y.shape == (*case["lead"], W.shape[0]) and y.dtype == case["dtype"]
    if y.numel() == 0:
        return
    finite = torch.isfinite(ref)
    # one NaN semantics on both backends: the formula's (non-finite exactly where the fp64 formula is)
    assert torch.equal(torch.isfinite(y.double().cpu()), finite), "non-finite entries differ from the formula"
    if not finite.any():
        return
    err = (y.double().cpu()[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30)
    assert err < REL_TOL[case["dtype"]], f"relative error {err:.3e}"
    if st is not None:
        kl, klr, en = stats64(x, W, b, loras)
        torch.testing.assert_close(st.energy.double().cpu(), en, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.kl.double().cpu(), kl, rtol=1e-3, atol=2e-6)
        torch.testing.assert_close(st.kl_reverse.double().cpu(), klr, rtol=1e-3, atol=2e-6)


def test_fuzz_covers_what_it_claims():
    """The generator reaches every rank class, both dtypes, each gate kind, zero-token samples, every
    NaN placement (one in a LoRA gated to 0) and each layout of every argument."""
    ranks = {r for c in CASES for r in c["ranks"]}
    assert set(RANK_CLASSES) <= ranks
    assert {c["dtype"] for c in CASES} == {torch.float32, torch.float16}
    assert {c["gate_kind"] for c in CASES} == {"none", "layer", "sample"}
    assert any(0 in c["lead"] and c["gate_kind"] == "sample" for c in CASES)
    assert {c["nan"] for c in CASES} >= set(NAN_PLACES) - {None}
    for arg in ("x", "W", "A", "B", "gates"):
        assert {c["layout"][arg] for c in CASES} >= {"step", "t"}, arg
    assert any(c["stats"] for c in CASES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_512_and_unequal_ranks(backend):
    """The largest supported rank beside a rank-1 LoRA (LoRA 0 reads one 16-wide slice of its 512 block)."""
    x, W, b, loras, _ = _build(dict(ranks=(1, 512), lead=(5,), K=16, N=8, scales=(1.0, -0.5),
                                    dtype=torch.float32, gate_kind="none", bias=True, nan=None), 7)
    y = fused_lora_linear(x, W, b, loras, backend=backend)
    ref = formula64(x, W, b, loras)
    assert (y.double().cpu() - ref).norm() / ref.norm() < REL_TOL[torch.float32]
