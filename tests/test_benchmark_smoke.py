"""Smoke test of the benchmarks: every provider runs on a tiny layer and computes the same function
(against an fp64 reference), so a benchmark cannot silently time wrong code. One round, no timing
assertions (speed never decides pass/fail)."""

import csv

import pytest
import torch

from benchmarks import providers as P
from benchmarks import run as R
from lorafuse.kernels._common import HAS_TRITON, interpreter_active

from .conftest import DEVICE

TINY = dict(M=64, K=64, N=64)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().cpu().double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("gates", [R.GATES["both"], R.GATES["onehot"], (0.0, 1.0)], ids=["both", "subject", "style"])
@pytest.mark.parametrize("rank", [4, 13])
def test_every_provider_matches_reference(rank, gates):
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    layer = P.make_layer(P.Case(**TINY, rank=rank, dtype=dtype, gates=gates), DEVICE)
    ref = P.reference(layer)
    for name in P.PROVIDERS:
        fn = P.build(name, layer)
        y = fn()
        assert y.shape == (TINY["M"], TINY["N"]) and y.dtype == dtype, name
        assert _rel(y, ref) < TOL[dtype], name
        assert _rel(fn(), ref) < TOL[dtype], f"{name}: second call differs"  # scratch / in-place state


@pytest.mark.skipif(not HAS_TRITON or (DEVICE == "cpu" and not interpreter_active()), reason="needs Triton")
def test_lorafuse_providers_on_the_triton_path():
    """The GPU benchmark times the Triton kernels: run those providers through them (interpreter on CPU)."""
    layer = P.make_layer(P.Case(**TINY, rank=8, dtype=torch.float32), DEVICE)
    ref = P.reference(layer)
    for name in ("lorafuse_static", "lorafuse_kl"):
        assert _rel(P.build(name, layer, backend="triton")(), ref) < 1e-3, name


def test_run_main_writes_csv_and_plot(tmp_path):
    out = tmp_path / "r.csv"
    argv = ["--device", "cpu", "--shapes", "64x64x48", "--ranks", "8", "--gates", "both,onehot", "--rounds", "1",
            "--csv", str(out), "--probe-copy-mb", "8", "--probe-gemm-n", "128"]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", "--plot-dir", str(tmp_path / "plots")]
    except ImportError:
        pass
    assert R.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["provider"] for r in rows} == set(P.PROVIDERS) | {"F.linear_repeat"}
    assert len(rows) == 2 * (len(P.PROVIDERS) + 1)
    assert all(float(r["rel_err"]) < 1e-5 and float(r["median_ms"]) > 0 for r in rows)
    if "--plot" in argv:
        assert len(list((tmp_path / "plots").glob("*.png"))) == 2


def test_fusion_methods_benchmark_smoke(tmp_path, capsys):
    """benchmarks.fusion_methods on 3 layers: the CSV gets its rows, the per-layer-loop baseline
    computes the same gates (asserted inside the benchmark), and the op counts are independent of L."""
    from benchmarks import fusion_methods as FM

    shapes = FM.sdxl_attention_shapes()
    assert len(shapes) == 560 and sum(K == 2048 for _, K, _ in shapes) == 140
    path = tmp_path / "fusion.csv"
    assert FM.main(["--device", "cpu", "--layers", "3", "--ranks", "4", "--rounds", "1", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert [(r["benchmark"], r["method"]) for r in rows] == [
        ("prepare", "klora"), ("prepare", "est"), ("gate_update", "klora"), ("gate_update", "est")]
    assert all(float(r["median_ms"]) > 0 and r["device"] and r["torch"] for r in rows)
    layers = FM.make_layers(shapes[:6], (4, 4), "cpu")
    for method in (FM.KLoRA(stats_backend="torch"), FM.ESTLoRA(stats_backend="torch")):
        method.prepare(layers, "cpu")
        few = FM.count_ops(lambda: method.begin_step(FM.Progress(tau=0.25)))
        method.prepare(layers[:2], "cpu")
        assert FM.count_ops(lambda: method.begin_step(FM.Progress(tau=0.25))) == few  # O(1) in the layer count


def test_overhead_probe_and_free_gate_log():
    """benchmarks.overhead counts the aten ops of one patched layer call; methods that decide once
    per step log from a per-call snapshot, so logging adds no op to their layer calls."""
    pytest.importorskip("diffusers")
    from benchmarks.overhead import layer_op_counts

    counts = layer_op_counts()
    assert counts["peft"] > 0 and counts["kl log=True"] > 0
    # kl's layer call (torch path, gate log on: its decisions are fresh tensors, kept without a copy)
    assert counts["kl log=True"] == counts["kl log=False"] <= counts["peft"], counts
    for method in ("klora", "est", "merge"):
        assert counts[f"{method} log=True"] == counts[f"{method} log=False"], counts


def test_serving_benchmark_smoke(monkeypatch):
    """One round of every (config, N); a request that fails fails its round (never a faster one)."""
    pytest.importorskip("diffusers")
    from benchmarks import serving as S

    rows = S.main(["--rounds", "1", "--steps", "1", "--no-csv"])
    assert [(r["config"], r["requests"]) for r in rows] == [(c, n) for c in S.CONFIGS for n in S.CONCURRENCY]
    assert all(float(r["images_per_s"]) > 0 for r in rows)

    def failing(shared, steps, seed):
        if seed == 1:
            raise ValueError("request 1 failed")

    monkeypatch.setattr(S, "_request", failing)
    with pytest.raises(RuntimeError, match="1 of 2 concurrent requests failed"):
        S._round(None, 2, 1)


def test_compiled_benchmark_smoke(tmp_path, capsys):
    """benchmarks.compiled, smallest group (tiny FLUX, regional, aot_eager, bare + klora, 1 round of
    2-step images): the CSV gets one well-formed row per configuration and the markdown table prints."""
    pytest.importorskip("diffusers")
    from benchmarks import compiled as C

    out = tmp_path / "compiled.csv"
    assert C.main(["--families", "flux", "--modes", "regional", "--backends", "aot_eager", "--methods", "klora",
                   "--rounds", "1", "--steps", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == C.FIELDS
    assert [(r["family"], r["mode"], r["backend"], r["order"], r["config"]) for r in rows] == [
        ("flux", "regional", "aot_eager", "after", c) for c in ("bare", "klora")]
    for r in rows:
        assert r["status"] == "ok" and float(r["ms_median"]) > 0 and float(r["compile_s"]) > 0, r
        assert int(r["graph_breaks"]) >= 0 and int(r["recompiles"]) >= int(r["recompiles_timed"]) >= 0, r
        assert float(r["max_abs_diff_vs_eager"]) < 1e-3, r  # compiled vs eager: same function
        assert r["torch"] and r["diffusers"] and r["peft"] and r["device"] and r["date"], r
    assert float(rows[0]["ratio_vs_bare"]) == 1.0
    assert "| flux | regional | aot_eager | after | klora |" in capsys.readouterr().out
