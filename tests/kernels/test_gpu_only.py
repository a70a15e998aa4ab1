"""GPU-only checks of the hardened kernels (skipped without CUDA; ``benchmarks.gpu_check`` runs them with
``-m gpu``): bf16 on every rank class, CUDA-graph capture and torch.compile of the statistics path at a
rank of several slices, and the compiled backward."""

import pytest
import torch

from lorafuse.kernels import PackedLoRA, fused_lora_forward, fused_lora_linear, lora_fixup

from ..conftest import requires_cuda
from .test_fused_lora_linear import formula64, make_layer

pytestmark = [pytest.mark.gpu, requires_cuda]

RANKS = [(1, 7), (16, 17), (33, 48), (64, 65), (96, 100), (128, 200), (512, 4)]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("ranks", RANKS, ids=lambda r: f"r{r[0]}-{r[1]}")
def test_every_rank_class_on_the_gpu(ranks, dtype, tol):
    x, W, b, loras = make_layer(None, 320, 640, ranks, (1.0, -0.5), dtype=dtype, lead=(2, 77))
    gates = torch.tensor([[1.0, 0.3], [0.0, 1.0]], device="cuda")
    y, st = fused_lora_linear(x, W, b, loras, gates, stats=True, backend="triton")
    ref = formula64(x, W, b, loras, gates)
    err = (y.double().cpu() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e}"
    assert torch.isfinite(st.kl).all() and (st.kl > -1e-3).all()


def test_cuda_graph_and_compile_of_the_kl_path_at_rank_48():
    x, W, b, loras = make_layer(None, 640, 640, (48, 96), (1.0, 1.0), dtype=torch.float16, lead=(2, 128))
    packed = PackedLoRA.pack(loras, dtype=torch.float16)
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device="cuda")
    new = torch.tensor([[0.0, 1.0], [0.0, 1.0]], device="cuda")

    def step():
        out = fused_lora_forward(x, W, b, packed, old, stats=True)
        lora_fixup(out.y, out.u, packed, new - old, out.rows_per_sample)
        return out.y

    ref = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.testing.assert_close(out, ref)
    compiled = torch.compile(lambda x_: fused_lora_linear(x_, W, b, packed, new), fullgraph=True)
    torch.testing.assert_close(compiled(x), fused_lora_linear(x, W, b, packed, new))
    y64 = formula64(x, W, b, loras, new)
    assert (ref.double().cpu() - y64).norm() / y64.norm() < 2e-3


def test_compiled_backward_matches_torch_path():
    x, W, b, loras = make_layer(None, 256, 320, (48, 8), (1.0, -0.5), lead=(2, 64))
    w = torch.randn(2, 64, 320, device="cuda")

    def grads(fn, backend):
        xs = x.detach().clone().requires_grad_()
        A = loras[0][0].detach().clone().requires_grad_()
        lo = [(A, loras[0][1], 1.0), loras[1]]
        (fn(xs, lo, backend) * w).sum().backward()
        return xs.grad, A.grad

    def f(xs, lo, backend):
        return fused_lora_linear(xs, W, b, lo, torch.tensor([0.7, 1.0], device="cuda"), backend=backend)

    dx, dA = grads(torch.compile(f), "triton")
    rx, rA = grads(f, "torch")
    torch.testing.assert_close(dx, rx, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dA, rA, rtol=1e-3, atol=1e-4)
