"""Gradients of ``fused_lora_linear`` on the Triton path (the registered op's backward) against the
torch path's autograd and against central finite differences along random directions:

    y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T,   d<w, y>/dv ~ (<w, y(p + h v)> - <w, y(p - h v)>) / 2h

for x, W, b, A_i, B_i, per-layer and per-sample gates and tensor scales.
"""

import pytest
import torch

from lorafuse.kernels import PackedLoRA, fused_lora_linear

from ..conftest import DEVICE
from .test_fused_lora_linear import make_layer

# (lead, K, N, ranks): 3-D input with per-sample gates, unequal ranks, one 48-wide (3 slices) rank
CASES = [((3, 7), 24, 20, (4, 13)), ((11,), 19, 33, (48, 1))]


def _inputs(lead, K, N, ranks, gate_kind):
    M = lead[0] if len(lead) == 1 else None
    x, W, b, loras = make_layer(M, K, N, ranks, [1.0, -0.5][: len(ranks)], lead=lead)
    if gate_kind == "layer":
        gates = torch.tensor([0.7, -1.2][: len(ranks)], device=DEVICE)
    elif gate_kind == "sample":
        gates = torch.randn(lead[0], len(ranks), device=DEVICE)
    else:
        gates = None
    return x, W, b, loras, gates


def _grads(backend, x, W, b, loras, gates, w):
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, b)]
    lora_leaves = [(A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(),
                    torch.tensor(float(s), device=DEVICE, requires_grad=True)) for A, B, s in loras]
    g = gates.detach().clone().requires_grad_() if gates is not None else None
    y = fused_lora_linear(*leaves, lora_leaves, g, backend=backend)
    (y * w).sum().backward()
    out = [t.grad for t in leaves] + [t.grad for trip in lora_leaves for t in trip]
    return out + ([g.grad] if g is not None else [])


def _case_id(c):
    return f"{'x'.join(map(str, c[0]))}K{c[1]}N{c[2]}r{'-'.join(map(str, c[3]))}"


@pytest.mark.parametrize("gate_kind", ["none", "layer", "sample"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_gradients_match_torch_path(case, gate_kind):
    if gate_kind == "sample" and len(case[0]) == 1:
        pytest.skip("per-sample gates need a batch dimension")
    x, W, b, loras, gates = _inputs(*case, gate_kind)
    w = torch.randn(*case[0], case[2], device=DEVICE)
    tri = _grads("triton", x, W, b, loras, gates, w)
    ref = _grads("torch", x, W, b, loras, gates, w)
    assert len(tri) == len(ref) and all(t is not None for t in tri)
    for i, (gt, gr) in enumerate(zip(tri, ref)):
        torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-5, msg=f"gradient {i}")


def test_triton_gradients_match_finite_differences():
    """Directional derivatives of <w, y> along a random v (all inputs at once and each input alone)."""
    lead, K, N, ranks = (2, 5), 24, 20, (4, 48)
    x, W, b, loras, gates = _inputs(lead, K, N, ranks, "sample")
    w = torch.randn(*lead, N, device=DEVICE)
    params = [x, W, b] + [t for A, B, _ in loras for t in (A, B)] + [gates]
    scales = [s for _, _, s in loras]

    def f(ps):
        x_, W_, b_, *rest = ps
        lo = [(rest[2 * i], rest[2 * i + 1], scales[i]) for i in range(len(ranks))]
        # fp32 forward in the interpreter: the sum is accumulated in fp64 on the host
        return (fused_lora_linear(x_, W_, b_, lo, rest[-1], backend="triton").double() * w.double()).sum()

    leaves = [p.detach().clone().requires_grad_() for p in params]
    f(leaves).backward()
    grads = [p.grad.double() for p in leaves]
    h = 1e-2  # f is a polynomial of degree <= 4 in h: the central difference's error is O(h^2) * small terms
    for which in [None] + list(range(len(params))):
        v = [torch.randn_like(p) if which in (None, i) else torch.zeros_like(p) for i, p in enumerate(params)]
        plus = f([p + h * d for p, d in zip(params, v)])
        minus = f([p - h * d for p, d in zip(params, v)])
        fd = float(plus - minus) / (2 * h)
        an = float(sum((g * d.double()).sum() for g, d in zip(grads, v)))
        assert abs(fd - an) <= 2e-3 * max(1.0, abs(an)), f"input {which}: finite difference {fd} vs gradient {an}"


def test_gradient_through_packed_factors_and_stats_call():
    """A PackedLoRA built from leaves passes gradients to A and B; the statistics partials are not
    differentiable (they drive decisions), the output still is."""
    x, W, b, loras, _ = _inputs((9,), 24, 20, (4, 13), "none")
    A0 = loras[0][0].detach().clone().requires_grad_()
    packed = PackedLoRA.pack([(A0, loras[0][1], 1.0), loras[1]])
    y, st = fused_lora_linear(x, W, b, packed, stats=True, backend="triton")
    assert not st.kl.requires_grad
    y.sum().backward()
    ref = A0.detach().clone().requires_grad_()
    fused_lora_linear(x, W, b, [(ref, loras[0][1], 1.0), loras[1]], backend="torch").sum().backward()
    torch.testing.assert_close(A0.grad, ref.grad, rtol=1e-4, atol=1e-5)
