"""fuse_modules on a stack of plain ``nn.Linear`` layers, on the engine: every method and weights mode
equals the fused path (weights="off") and the fp64 formula with the method's gates, at every step of
a run whose gates flip; a merged layer call dispatches exactly the bare layer's aten ops; remove()
restores every module bit for bit; the gate log and summary() say what ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.launches import count_launches
from lorafuse.engine import ModuleFusion, SamplingRun, fuse_modules
from lorafuse.fusion import METHODS

from ..fusion.reference import formula64, rand_layers

WEIGHTS = ("scratch", "inplace", "off")
TAUS = [k / 10 for k in range(10)]
OPTIONS = {"klora": {}, "est": {}, "kl": {}, "merge": {"subject_weight": 0.7, "style_weight": -0.4},
           "subject": {}, "style": {}}


def count_ops(fn) -> int:
    """aten ops dispatched by ``fn()`` (each at least one kernel launch on a GPU)."""
    return count_launches(fn).ops


def stack(n=5, seed=3):
    """n linears of varied shapes (bias on every other one) with their two LoRAs, inputs, and a copy of
    the original weights."""
    layers = rand_layers(n, seed=seed)
    torch.manual_seed(seed)
    mods = [nn.Linear(l.subject[0].shape[1], l.subject[1].shape[0], bias=i % 2 == 0) for i, l in enumerate(layers)]
    xs = [torch.randn(2, 7, m.in_features, generator=torch.Generator().manual_seed(10 + i)) for i, m in enumerate(mods)]
    return mods, layers, xs, [m.weight.detach().clone() for m in mods]


def fuse(mods, layers, method, weights, **kw):
    return fuse_modules(mods, [l.subject for l in layers], [l.style for l in layers], method, weights=weights,
                        names=[l.name for l in layers], backend="torch", **{**OPTIONS[method], **kw})


def close(y, ref):
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def run_steps(fused, mods, xs, layers, w0, taus=TAUS):
    """Per step: every module's output and gates, each output checked against the fp64 formula on the
    original weights (with weights="inplace" the modules' own weights hold W_eff)."""
    outs, gates = [], []
    for tau in taus:
        fused.step(tau)
        for i, (m, x, layer) in enumerate(zip(mods, xs, layers)):
            y = m(x)
            g = fused.decision(i).gates.double()
            close(y, formula64(x, w0[i], m.bias, [layer.subject, layer.style], g if g.shape[0] > 1 else g[0]))
            outs.append(y)
            gates.append(g.clone())
    return outs, gates


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_and_weights_mode_equals_the_fused_path_and_fp64(method, weights):
    mods, layers, xs, w0 = stack()
    with torch.no_grad():
        ref = fuse(mods, layers, method, "off")
        ref_out, ref_gates = run_steps(ref, mods, xs, layers, w0)
        ref.remove()
        fused = fuse(mods, layers, method, weights)
        expected = "merged" if weights != "off" and method != "kl" else "fused"
        assert fused.summary()["path"] == expected
        out, gates = run_steps(fused, mods, xs, layers, w0)
        assert fused.summary()["fallback_calls"] == {}
        fused.remove()
    assert all(torch.equal(a, b) for a, b in zip(gates, ref_gates))
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if method in ("klora", "est"):  # the run flips: some layer's gates change between steps
        per_layer = [{tuple(g.flatten().tolist()) for g in gates[i::len(mods)]} for i in range(len(mods))]
        assert any(len(s) == 2 for s in per_layer), per_layer


@pytest.mark.parametrize("method", ["klora", "est"])
@pytest.mark.parametrize("weights", ["scratch", "inplace"])
def test_official_tau_mode_on_merged_weights_equals_the_fused_path(method, weights):
    """Official counter mode decides per layer call on the host: the merged path rebuilds a layer when
    its call's gates differ from its weight's, and gives the fused path's decisions and outputs."""
    mods, layers, xs, w0 = stack(4, seed=5)
    steps = 8
    with torch.no_grad():
        results = {}
        for mode in ("off", weights):
            fused = fuse(mods, layers, method, mode, tau_mode="official")
            ys, gs = [], []
            for k in range(steps):
                fused.step(0.5, num_steps=steps)
                for i, (m, x) in enumerate(zip(mods, xs)):
                    ys.append(m(x))
                    gs.append((fused.decision(i).gates.tolist(), fused.decision(i).tau))
            results[mode] = (ys, gs, fused.gate_log)
            fused.remove()
    (y0, g0, log0), (y1, g1, log1) = results["off"], results[weights]
    assert g0 == g1 and len({str(g) for g, _ in g0}) == 2
    assert log0 == log1 and len(log1) == steps * len(mods)
    for a, b in zip(y0, y1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["klora", "merge", "subject"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_merged_layer_call_dispatches_the_bare_layers_ops(method, bias):
    """Per call, a merged layer runs exactly the aten ops of the bare nn.Linear: one F.linear."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    layer = rand_layers(1, seed=2, shapes=((40, 48),))[0]
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        bare = count_ops(lambda: lin(x))
        fused = fuse_modules([lin], [layer.subject], [layer.style], method, backend="torch")
        for tau in (0.0, 0.5, 0.9):
            fused.step(tau)
            lin(x)  # the first call of a step may build the merged weight
            assert count_ops(lambda: lin(x)) == bare
        assert fused.summary()["path"] == "merged"
        fused.remove()


def _snapshot(lin):
    return {"dict": dict(lin.__dict__), "params": [(n, p.data_ptr(), p._version) for n, p in lin.named_parameters()],
            "state": {k: v.clone() for k, v in lin.state_dict().items()}}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("method", ["klora", "merge", "kl"])
def test_remove_restores_every_module_exactly(method, weights):
    mods, layers, xs, w0 = stack(3)
    with torch.no_grad():
        base = [m(x) for m, x in zip(mods, xs)]
        before = [_snapshot(m) for m in mods]
        fused = fuse(mods, layers, method, weights)
        run_steps(fused, mods, xs, layers, w0, taus=[0.0, 0.5, 0.9])
        if weights == "inplace" and method != "kl":  # W holds W_eff while fused
            assert not all(torch.equal(m.weight, b["state"]["weight"]) for m, b in zip(mods, before))
        else:  # W untouched
            assert all(torch.equal(m.weight, b["state"]["weight"]) for m, b in zip(mods, before))
        fused.remove()
        for m, b, x, y in zip(mods, before, xs, base):
            after = _snapshot(m)
            assert "forward" not in m.__dict__
            assert after["dict"].keys() == b["dict"].keys()
            assert [p[:2] for p in after["params"]] == [p[:2] for p in b["params"]]
            assert all(torch.equal(after["state"][k], v) for k, v in b["state"].items())  # bit for bit
            assert torch.equal(m(x), y)
        fused.remove()  # idempotent
        assert all(torch.equal(m(x), y) for m, x, y in zip(mods, xs, base))


def test_gate_log_summary_and_run_state():
    mods, layers, xs, w0 = stack(3)
    with torch.no_grad():
        fused = fuse(mods, layers, "klora", "scratch")
        assert isinstance(fused, ModuleFusion) and isinstance(fused.run, SamplingRun)
        for m, x in zip(mods, xs):  # before the first step(): tau 0, not logged
            m(x)
        assert fused.gate_log == [] and fused.run.step == 0
        run_steps(fused, mods, xs, layers, w0, taus=[0.0, 0.4, 0.8])
        assert fused.run.step == 3 and fused.run.tau == 0.8
        log = fused.gate_log
        assert len(log) == 3 * len(mods)
        assert [e["call"] for e in log] == [c for c in range(3) for _ in mods]
        assert [e["layer"] for e in log[:3]] == [l.name for l in layers]
        assert {e["tau"] for e in log} == {0.0, 0.4, 0.8}
        for e in log:
            assert (e["subject"], e["style"]) in ((1.0, 0.0), (0.0, 1.0))
            assert {"layer_index", "timestep", "subject_score", "style_score"} <= e.keys()
        fused.clear_gate_log()
        assert fused.gate_log == []
        fused.new_run()
        assert fused.run.step == 0
        fused.step(0.2)
        mods[0](xs[0])
        assert [(e["call"], e["layer_index"]) for e in fused.gate_log] == [(3, 0)]
        info = fused.summary()
        assert info.pop("gate_log") == {"keeps": "the last sampling run", "calls": 1, "sink": None}
        assert info == {"method": "klora", "layers": 3, "path": "merged", "weights": "scratch", "fallback_calls": {}}
        fused.remove()
        off = fuse(mods, layers, "klora", "off", log_gates=False)
        off.step(0.1)
        mods[1](xs[1])
        assert off.gate_log == [] and off.summary()["path"] == "fused" and off.summary()["weights"] is None
        off.remove()


def test_autograd_calls_take_the_fused_path_with_the_same_result():
    mods, layers, xs, w0 = stack(2)
    fused = fuse(mods, layers, "klora", "inplace")
    fused.step(0.3)
    with torch.no_grad():
        merged = [m(x) for m, x in zip(mods, xs)]
    ys = [m(x) for m, x in zip(mods, xs)]  # weights require grad: the fused path, on the original W
    ys[0].sum().backward()
    assert mods[0].weight.grad is not None
    for a, b in zip(ys, merged):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5)
    assert fused.summary()["fallback_calls"] == {"autograd enabled with trainable weights": 2}
    with torch.no_grad():  # back on the merged path
        assert all(torch.allclose(m(x), y, rtol=1e-5, atol=1e-5) for m, x, y in zip(mods, xs, merged))
    fused.remove()


@pytest.mark.parametrize("weights", ["scratch", "inplace"])
def test_factors_written_in_place_are_merged_at_the_next_step(weights):
    mods, layers, xs, w0 = stack(2)
    with torch.no_grad():
        fused = fuse(mods, layers, "merge", weights)
        fused.step(0.0)
        before = mods[0](xs[0])
        layers[0].subject[1].mul_(2.0)  # B_c doubled
        fused.step(0.1)
        after = mods[0](xs[0])
        close(after, formula64(xs[0], w0[0], mods[0].bias, [layers[0].subject, layers[0].style],
                               torch.tensor([0.7, -0.4], dtype=torch.float64)))
        assert not torch.equal(after, before)
        fused.remove()


def test_errors_name_the_option():
    mods, layers, _, _ = stack(1)
    with pytest.raises(ValueError, match=r"fuse_module: weights must be one of \('scratch', 'inplace', 'off'\), got 'x'"):
        fuse(mods, layers, "klora", "x")
    with pytest.raises(ValueError, match="fuse_module: backend must be one of"):
        fuse_modules(mods, [layers[0].subject], [layers[0].style], backend="cuda")
    assert "forward" not in mods[0].__dict__
