"""pytest-benchmark suite: one patched linear's forward per provider (see :mod:`benchmarks.providers`).

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Small shapes on CPU (fp32), the SDXL/FLUX shapes of run.py on a GPU (fp16). Each case is one benchmark group, so
pytest-benchmark's table compares the providers of a case side by side; on a GPU every timed call
ends with a synchronize. Output is checked against the reference once per case; nothing here
asserts a speed. For the full sweep (CUDA events, CUDA graphs, rotating inputs, roofline, CSV) use
``python -m benchmarks.run``.
"""

import pytest
import torch

from benchmarks import providers as P

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    CASES = [P.Case(M, K, N, r, torch.float16) for (M, K, N) in ((8192, 640, 640), (2048, 1280, 1280)) for r in (8, 64)]
else:
    CASES = [P.Case(256, 640, 640, 8, torch.float32), P.Case(512, 1280, 1280, 8, torch.float32)]


def _id(case: P.Case) -> str:
    return f"{case.shape}-r{case.rank}-{str(case.dtype).replace('torch.', '')}"


@pytest.fixture(scope="module", params=CASES, ids=_id)
def layer(request):
    return P.make_layer(request.param, DEVICE)


@pytest.mark.parametrize("provider", P.PROVIDERS)
def test_provider(benchmark, layer, provider):
    fn = P.build(provider, layer)
    ref = P.reference(layer, torch.float32, DEVICE)
    err = float((fn().float() - ref).norm() / ref.norm())
    assert err < (1e-5 if layer.case.dtype == torch.float32 else 1e-2), f"{provider} computes something else"

    def call():
        y = fn()
        if CUDA:
            torch.cuda.synchronize()
        return y

    benchmark.group = _id(layer.case)
    benchmark.extra_info.update(shape=layer.case.shape, rank=layer.case.rank, dtype=str(layer.case.dtype),
                                gates=layer.case.gate_name, device=DEVICE)
    benchmark(call)
