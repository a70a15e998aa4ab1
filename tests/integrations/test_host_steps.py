"""The per-denoiser-call work of accelerate_fusion when the host knows the timestep (CPU runs).

The pre-hook reads a CPU timestep on the host and the static methods decide on the host: these
tests pin that this gives the same taus, gates, logs and images, bit for bit, as the device-side
tensor path (the path of a CUDA timestep), and that a steady-state denoiser call of a merged method
dispatches no more aten ops than the LoRA-disabled call plus a constant (none per layer)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.fusion import get_method  # noqa: E402
from lorafuse.fusion.base import Decision, LayerLoRAs, Progress  # noqa: E402
from lorafuse.integrations import accelerate_fusion  # noqa: E402
from lorafuse.integrations import denoiser_hook as dif  # noqa: E402  (where the pre-hook reads _progress_of)
from lorafuse.engine.gate_log import GateLog  # noqa: E402

from .test_diffusers import close, make  # noqa: E402
from .tiny import denoiser, peft_layers, run  # noqa: E402


def device_progress(ts, divisor):
    """The tensor branch of _progress_of, whatever the timestep's device (what a CUDA run computes)."""
    t0 = ts.reshape(-1)[0].to(torch.float32) if ts.numel() else ts.new_zeros((), dtype=torch.float32)
    return t0, (1.0 - t0 / divisor).clamp(0.0, 1.0)


def test_host_tau_equals_the_fp32_tensor_ops_bit_for_bit():
    rng = random.Random(0)
    values = [torch.tensor(i) for i in range(-3, 1003)]
    values += [torch.tensor(rng.uniform(-5, 1005), dtype=torch.float64) for _ in range(1500)]
    values += [torch.tensor(rng.uniform(0, 1), dtype=dt) for dt in (torch.float32, torch.float16, torch.bfloat16)
               for _ in range(300)]
    values += [torch.tensor([981, 961]), torch.tensor([[0.25]])]
    for divisor in (1000.0, 1.0, 999.7, 3.3):
        for ts in values:
            t0, tau = dif._progress_of(ts, divisor)
            d0, dtau = device_progress(ts, divisor)
            assert isinstance(tau, float) and isinstance(t0, float)
            assert (t0, tau) == (d0.item(), dtau.item()), (ts, divisor)


def _layers(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        K, N, rc, rs = 24, 20, 4, 6
        sub = (torch.randn(rc, K, generator=g), torch.randn(N, rc, generator=g) * (0.2 + i / n), 1.0)
        sty = (torch.randn(rs, K, generator=g), torch.randn(N, rs, generator=g) * (1.2 - i / n), 0.5)
        out.append(LayerLoRAs(f"l{i}", sub, sty))
    return out


@pytest.mark.parametrize("name,options", [
    ("klora", {"pattern": "s"}), ("klora", {"pattern": "s*"}), ("est", {}), ("est", {"pattern": "s*", "alpha": 0.7}),
])
def test_host_decisions_equal_device_decisions(name, options):
    """begin_step with a float tau (host) and with the same value as a 0-d tensor (device) give the
    same gates and S bit for bit, at taus all over [0, 1] and right at every layer's threshold."""
    layers = _layers()
    host, dev = get_method(name, **options), get_method(name, **options)
    host.prepare(layers)
    dev.prepare(layers)
    taus = [i / 400 for i in range(401)] + [torch.rand(()).item() for _ in range(100)]
    for tau in taus:
        t32 = torch.tensor(tau, dtype=torch.float32)
        dev.begin_step(Progress(tau=t32))
        host.begin_step(Progress(tau=t32.item()))
        assert torch.equal(host._gates, dev._gates), tau
        assert float(host._S) == float(dev._S)
        hd, dd = host.step_decisions(), dev.step_decisions()
        assert hd.tau == dd.tau.item() and torch.equal(hd.gates, dd.gates)


def test_host_step_writes_the_gates_only_when_a_layer_flips():
    m = get_method("klora")
    m.prepare(_layers())
    m.begin_step(Progress(tau=0.0))
    before, version = m._gates.clone(), m._gates._version
    table = m.decision_table([0.0, 0.3])
    m.begin_step(Progress(tau=0.3))
    if torch.equal(table[:, 0], table[:, 1]):
        assert m._gates._version == version
    else:
        assert m._gates._version > version and not torch.equal(m._gates, before)
    version = m._gates._version
    m.begin_step(Progress(tau=0.3))
    assert m._gates._version == version  # same decisions: not written


@pytest.mark.parametrize("name,options", [("klora", {"pattern": "s*"}), ("est", {}), ("merge", {"subject_weight": 0.7})])
def test_pipeline_with_host_steps_equals_device_steps(monkeypatch, name, options):
    """A whole generation with the host path and with the device path forced: same gate log (gates,
    taus, statistics) and the same image, bit for bit."""
    pipe = make("sd15")
    out, logs = {}, {}
    for path in ("host", "device"):
        if path == "device":
            monkeypatch.setattr(dif, "_progress_of",
                                lambda ts, div: device_progress(ts, div) if isinstance(ts, torch.Tensor)
                                else (float(ts), min(1.0, max(0.0, 1.0 - float(ts) / div))))
        h = accelerate_fusion(pipe, "sbj", "sty", name, backend="torch", **options)
        out[path] = run(pipe, "sd15", steps=5)
        logs[path] = h.gate_log
        h.remove()
    assert torch.equal(out["host"], out["device"])
    assert logs["host"] == logs["device"]
    assert len(logs["host"]) == 5 * h.num_layers


@pytest.mark.parametrize("name,weights", [("klora", "scratch"), ("est", "inplace"), ("merge", "scratch")])
def test_steady_denoiser_call_ops_equal_the_disabled_call_plus_a_constant(name, weights):
    """Counted, not timed: a steady-state denoiser call of a merged method dispatches the aten ops of
    the LoRA-disabled call plus at most 3 (reading the timestep, writing tau, ...), none per layer."""
    from benchmarks.fusion_methods import count_ops

    pipe = make("sd15")
    unet = denoiser(pipe)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ehs = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)

    def call():
        unet(x, t, encoder_hidden_states=ehs)

    with torch.no_grad():
        unet.disable_lora()  # (disable_adapters() raises in diffusers 0.32 after load_lora_weights)
        call()
        disabled = count_ops(call)
        unet.enable_lora()
        h = accelerate_fusion(pipe, "sbj", "sty", name, backend="torch", weights=weights)
        call()
        call()  # the first calls build the merged weights
        ops = count_ops(call)
        h.remove()
    assert len(list(peft_layers(unet))) >= 8
    assert disabled <= ops <= disabled + 3, (ops, disabled)


class _Fixed:
    """A per-step method double for the gate log: fixed gates for `n` layers."""

    dynamic = False

    def __init__(self, n):
        self.gates = torch.tensor([[1.0, 0.0]] * n)

    def step_decisions(self):
        return Decision(self.gates, 0.5, {})


def test_gate_log_reads_and_clears_in_the_middle_of_a_call():
    class Rec:
        def __init__(self, i):
            self.path, self.component = f"l{i}", "unet"

    log = GateLog(_Fixed(4), [Rec(i) for i in range(4)])
    add = log.begin_call(0, 900.0, 0.1)
    add(0)
    assert [e["layer_index"] for e in log.entries()] == [0]  # read mid-call ...
    add(1)  # ... the call's recorder keeps working
    add = log.begin_call(1, 800.0, 0.2)
    add(2)
    assert [(e["call"], e["layer_index"]) for e in log.entries()] == [(0, 0), (0, 1), (1, 2)]
    log.clear()
    add(3)
    assert [(e["call"], e["layer_index"], e["subject"]) for e in log.entries()] == [(1, 3, 1.0)]


def test_inplace_edit_of_a_lora_factor_is_picked_up_at_the_next_run():
    """Version counters are read once per sampling run: a factor written in place between two
    pipeline calls is merged into the next call (merge = PEFT's sum) and warned about."""
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", "merge", backend="torch")
    run(pipe, "sd15", steps=2)
    _, m = next((n, m) for n, m in peft_layers(denoiser(pipe)) if n.endswith("attn2.to_v"))
    with torch.no_grad():
        m.lora_B["sty"].weight.mul_(3.0)
    with pytest.warns(UserWarning, match="LoRA weights changed"):
        out = run(pipe, "sd15", steps=2)
    h.remove()
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    ref = run(pipe, "sd15", steps=2)
    assert close(out, ref), (out - ref).abs().max()  # the tolerance scales with the output's magnitude
