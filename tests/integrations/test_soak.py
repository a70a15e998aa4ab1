"""Soak (issue 21): 300 generations on one installation and 100 install / generate / remove cycles
on the tiny SD1.5 (1 step, 16 x 16, one torch thread): host RSS after ``gc.collect()``, the live
torch tensors of the process and the gate log's size stay flat. Bounds: the live tensors and the
gate log do not move at all (the log holds the last run: 1 denoiser call, one entry per patched
layer); RSS, also after glibc's malloc_trim, grows by less than 2 MiB from the first half of the
samples to the second (a log that kept everything grows by ~3.4 MiB here, ~10 MiB over the run). The longer variant:
``python -m benchmarks.soak``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from benchmarks.soak import growth, soak_cycles, soak_generations, tiny_pipeline  # noqa: E402

RSS_MIB = 2.0  # the most RSS may grow from the first half of the samples to the second


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(n)


def assert_flat(rows, log_entries):
    tensors = growth(rows, "tensors")
    assert tensors["half"] == 0 and tensors["last"] == tensors["first"], tensors
    assert {r["log_entries"] for r in rows} == {log_entries}, [r["log_entries"] for r in rows]
    for key in ("rss_mib", "rss_trimmed_mib"):
        rss = growth(rows, key)
        assert rss["half"] < RSS_MIB, (key, rss)


def test_soak_generations_and_install_cycles_stay_flat(one_thread):
    pipe = tiny_pipeline()
    rows = soak_generations(pipe, 300, every=20)
    assert {r["log_calls"] for r in rows} == {1}
    assert_flat(rows, 32)
    assert_flat(soak_cycles(pipe, 100, every=10), 0)
