"""accelerate_fusion on the engine: each generation is a sampling run of its own (a fresh
:class:`~lorafuse.engine.SamplingRun`: step counted from 0, tau of its current call), while the
installation counts every denoiser call; the gate log numbers the calls across runs."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.engine import SamplingRun  # noqa: E402
from lorafuse.integrations import accelerate_fusion, installed_fusion  # noqa: E402

from .test_diffusers import make  # noqa: E402
from .tiny import denoiser, run  # noqa: E402


def test_each_generation_is_a_run_of_its_own():
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", log_gates="all")  # the log of both runs
    assert installed_fusion(denoiser(pipe)) is h and h.run is None
    run(pipe, "sd15", steps=3)
    first = h.run
    assert isinstance(first, SamplingRun) and first.step == 3 and h.calls == 3
    run(pipe, "sd15", steps=2)
    second = h.run
    assert second is not first and second.step == 2 and first.step == 3 and h.calls == 5
    assert isinstance(second.tau, float) and 0.0 < second.tau <= 1.0  # the last call's progress
    assert sorted({e["call"] for e in h.gate_log}) == [0, 1, 2, 3, 4]
    assert h.summary()["path"] == "merged"
    h.remove()
    assert installed_fusion(denoiser(pipe)) is None
