"""What fuse_modules' gate log keeps (issue 21), without diffusers: the current run by default (a
run: the steps since new_run()), everything, the last N steps, and a sink that gets every record
once (kl: records per module call, klora: per step); remove() leaves no device tensor in the log."""

from __future__ import annotations

import json

import pytest
import torch

from lorafuse.engine import JsonLinesSink

from .test_fuse_modules import fuse, stack


def two_runs(fused, mods, xs):
    """Run 1: 2 steps; run 2: 3 steps; every module called once per step."""
    with torch.no_grad():
        for steps in (2, 3):
            fused.new_run()
            for k in range(steps):
                fused.step(k / steps)
                for m, x in zip(mods, xs):
                    m(x)


@pytest.mark.parametrize("method", ["klora", "kl"])
def test_keep_and_sink(method, tmp_path):
    mods, layers, xs, _ = stack(3)
    calls = {}
    for keep in (True, "all", 2, False):
        got = []
        fused = fuse(mods, layers, method, "scratch", log_gates=keep, gate_log_sink=got.extend)
        two_runs(fused, mods, xs)
        calls[keep] = sorted({e["call"] for e in fused.gate_log})
        fused.remove()
        assert [e["call"] for e in got] == [c for c in range(5) for _ in mods]  # every record, once
        if keep == "all":
            assert got == fused.gate_log
        assert not fused.engine.log._clones and not fused.engine.log._batches  # removed: nothing on the device
    assert calls == {True: [2, 3, 4], "all": [0, 1, 2, 3, 4], 2: [3, 4], False: []}
    path = tmp_path / "log.jsonl"
    fused = fuse(mods, layers, method, "off", log_gates=False, gate_log_sink=path)
    assert isinstance(fused.engine.log.sink, JsonLinesSink)
    two_runs(fused, mods, xs)
    fused.remove()
    assert [json.loads(s)["call"] for s in path.read_text().splitlines()] == [c for c in range(5) for _ in mods]


def test_bad_values_raise():
    mods, layers, _, _ = stack(2)
    for bad, err in (("everything", ValueError), (0, ValueError), (2.0, TypeError), ([1], TypeError)):
        with pytest.raises(err, match="log_gates"):
            fuse(mods, layers, "klora", "scratch", log_gates=bad)
    with pytest.raises(TypeError, match="gate_log_sink"):
        fuse(mods, layers, "klora", "scratch", gate_log_sink=object())
    assert all("forward" not in m.__dict__ for m in mods)
