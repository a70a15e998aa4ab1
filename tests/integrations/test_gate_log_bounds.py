"""What the gate log keeps (issue 21): the last sampling run by default, everything with
``log_gates="all"``, the last N denoiser calls with an int, and every record streamed to a sink
(a callable or a JSON-lines file) whatever it keeps; bad values raise when installing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.integrations import accelerate_fusion  # noqa: E402

from .test_diffusers import make  # noqa: E402
from .tiny import run  # noqa: E402


def calls(log):
    return sorted({e["call"] for e in log})


def test_default_keeps_the_last_run_all_keeps_everything_int_keeps_n_calls():
    pipe = make("sd15")
    kept = {}
    for log_gates in (True, "run", "all", 2):
        h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", log_gates=log_gates)
        run(pipe, "sd15", steps=2)
        first = calls(h.gate_log)
        run(pipe, "sd15", steps=3)
        kept[log_gates] = (first, calls(h.gate_log), h.summary()["gate_log"])
        assert len(h.gate_log) == len(calls(h.gate_log)) * h.num_layers
        h.remove()
    last_run = ([0, 1], [2, 3, 4], {"keeps": "the last sampling run", "calls": 3, "sink": None})
    assert kept[True] == kept["run"] == last_run
    assert kept["all"] == ([0, 1], [0, 1, 2, 3, 4], {"keeps": "everything", "calls": 5, "sink": None})
    assert kept[2] == ([0, 1], [3, 4], {"keeps": "the last 2 denoiser calls", "calls": 2, "sink": None})


@pytest.mark.parametrize("method", ["klora", "kl"])
def test_sink_gets_every_record_once(method, tmp_path):
    """A callable and a JSON-lines file get the records of every call, equal to the "all" log; with
    ``log_gates=False`` nothing is held. kl logs per layer call (stacked records), klora per step."""
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", log_gates="all")
    run(pipe, "sd15", steps=2)
    run(pipe, "sd15", steps=3)
    everything = list(h.gate_log)
    h.remove()
    got, sizes = [], []
    path = tmp_path / "gates.jsonl"
    for sink in ((lambda entries: (got.extend(entries), sizes.append(len(entries)))), path):
        h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", log_gates=False, gate_log_sink=sink)
        run(pipe, "sd15", steps=2)
        run(pipe, "sd15", steps=3)
        assert h.gate_log == [] and h.summary()["gate_log"]["keeps"] == "nothing"
        h.remove()  # the last call's records go out here
    assert got == everything and sizes == [h.num_layers] * 5  # one list per denoiser call
    assert [json.loads(line) for line in path.read_text().splitlines()] == everything
    # a sink beside the default log: the log keeps the last run, the sink everything
    got.clear()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", gate_log_sink=got.extend)
    run(pipe, "sd15", steps=2)
    run(pipe, "sd15", steps=3)
    assert h.gate_log == everything[2 * h.num_layers:]
    h.remove()
    assert got == everything


def test_bad_log_options_raise():
    pipe = make("sd15")
    for bad, err, text in (("last", ValueError, "log_gates must be True, False, one of"),
                           (0, ValueError, "must be >= 1"), (-3, ValueError, "must be >= 1"),
                           (1.5, TypeError, "log_gates must be a bool")):
        with pytest.raises(err, match=text):
            accelerate_fusion(pipe, "sbj", "sty", "klora", log_gates=bad)
    with pytest.raises(TypeError, match="gate_log_sink must be a callable"):
        accelerate_fusion(pipe, "sbj", "sty", "klora", gate_log_sink=3)
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())  # nothing installed
