"""pytest-benchmark: the per-step gate update of the static methods for the 560 SDXL attention
linears (``begin_step``) next to a per-layer Python loop, and the static-statistics preparation of a
few layers. See :mod:`benchmarks.fusion_methods` for the full run; nothing here asserts a speed.

    pytest benchmarks/test_bench_fusion.py --benchmark-only
"""

import pytest
import torch

from benchmarks import fusion_methods as FM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton" if DEVICE == "cuda" else "torch"
FACTORIES = {"klora": lambda: FM.KLoRA(stats_backend=BACKEND), "est": lambda: FM.ESTLoRA(stats_backend=BACKEND)}


def _synced(fn):
    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return call


@pytest.fixture(scope="module")
def layers():
    return FM.make_layers(FM.sdxl_attention_shapes(), (8, 8), DEVICE)


@pytest.mark.parametrize("method", list(FACTORIES))
@pytest.mark.parametrize("update", ["begin_step", "per_layer_loop"])
def test_gate_update_560_layers(benchmark, layers, method, update):
    benchmark.group = f"gate update {method}, 560 layers"
    m = FACTORIES[method]()
    m.prepare(layers, DEVICE)
    tau = torch.full((), 0.3, dtype=torch.float64, device=DEVICE)
    m.begin_step(FM.Progress(tau=tau))
    expected = m._gates.clone()
    loop = FM.per_layer_loop(m)
    fn = (lambda: m.begin_step(FM.Progress(tau=tau))) if update == "begin_step" else (lambda: loop(tau))
    benchmark(_synced(fn))
    assert torch.equal(m._gates, expected)


@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("method", list(FACTORIES))
def test_prepare_16_layers(benchmark, method, rank):
    benchmark.group = "prepare, 16 SDXL layers"
    few = FM.make_layers(FM.sdxl_attention_shapes()[:16], (rank, rank), DEVICE)
    benchmark.pedantic(_synced(lambda: FACTORIES[method]().prepare(few, DEVICE)), rounds=3, warmup_rounds=1)
