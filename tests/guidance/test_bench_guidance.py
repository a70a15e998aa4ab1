"""Smoke test of benchmarks/guidance.py: one tiny round writes well-formed rows (no timing assertions)."""

import csv

from benchmarks import guidance as B


def test_benchmark_writes_csv(tmp_path):
    out = tmp_path / "g.csv"
    assert B.main(["--configs", "tiny", "--modes", "vae", "--steps", "2", "--rounds", "1",
                   "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["mode"] for r in rows] == ["vae"]
    assert set(rows[0]) == set(B.CSV_FIELDS)
    for r in rows:
        assert float(r["guided_ms"]) > 0 and float(r["unguided_ms"]) > 0 and float(r["ratio"]) > 0
        assert r["machine"] and r["torch"] and r["diffusers"] != "none" and r["date"]
