"""The GPU check's dry run (CPU, tiny shapes, Triton through the interpreter) writes every file a real
run writes, and each part reports a status; a failing part is recorded without stopping the others."""

import csv
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")


def test_gpu_check_dry_run_writes_everything(tmp_path):
    from benchmarks import gpu_check as G

    out = tmp_path / "gpu"
    G.main(["--out", str(out), "--dry-run"])
    for name in ("summary.md", "env.json", "results.json", "fuzz.csv", "fuzz.png", "layer.csv", "e2e.csv",
                 "e2e.png", "pytest.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "plots").glob("*.png"))
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(G.PARTS)
    assert results["fuzz"]["status"] == "ok" and results["layer"]["status"] == "ok"
    assert results["pytest"]["status"] in ("ok", "timeout")  # collect-only; a loaded CI box may be slow
    rows = list(csv.DictReader((out / "fuzz.csv").open()))
    assert {r["kernel"] for r in rows} == set(G.FUZZ) and all(r["ok"] == "True" for r in rows)
    e2e = list(csv.DictReader((out / "e2e.csv").open()))
    assert {r["model"] for r in e2e} == {"sdxl", "flux"}
    assert not [r for r in e2e if r["status"].startswith("failed")], e2e
    bare = [r for r in e2e if r["variant"] == "bare" and r["mode"] == "eager"]
    assert len(bare) == 2 and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in bare)
    summary = (out / "summary.md").read_text()
    for text in ("torch", "triton", "git_commit", "driver", "## Parts", "Denoiser step", "x bare"):
        assert text in summary, text


def test_failing_part_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    from benchmarks import gpu_check as G

    def boom(out, dry, limit):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setitem(G.RUNNERS, "fuzz", boom)
    out = tmp_path / "gpu"
    assert G.main(["--out", str(out), "--dry-run", "--parts", "fuzz,layer"]) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["fuzz"]["status"] == "failed" and "simulated CUDA error" in results["fuzz"]["note"]
    assert results["layer"]["status"] == "ok"
    assert "simulated CUDA error" in (out / "summary.md").read_text()
