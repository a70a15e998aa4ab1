"""torch.compile on top of lorafuse (issue 22): the methods whose gates are fixed within a denoiser
call read their merged weight W_eff as a graph input (one ``F.linear`` per layer, no graph break, no
recompilation across steps, runs, flips), regional and whole-module compilation, compiled before or
after ``accelerate_fusion``; the compiled image equals the eager lorafuse image, the gate log holds
the same decisions, and ``remove()`` leaves the denoiser's weights exactly as they were.

Backend "aot_eager" (traces and partitions like Inductor, runs the aten graph without code
generation): what Dynamo does with the layers is what these tests check, in CI time.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lorafuse.fusion import KLoRA
from lorafuse.integrations import accelerate_fusion

from .tiny import denoiser, flux_pipeline, load_two, run, sdxl_pipeline

BUILD = {"sdxl": sdxl_pipeline, "flux": flux_pipeline}
COMPONENT = {"sd15": "unet", "sdxl": "unet", "flux": "transformer"}


def make(family):
    pipe = BUILD[family]()
    pipe.set_progress_bar_config(disable=True)
    load_two(pipe, family)
    return pipe


def close(a, b):
    """Equal within fp32 rounding of the values compared (aot_eager runs the same aten ops)."""
    return (a - b).abs().max().item() <= 1e-6 * (1 + b.abs().max().item())


def need(mode):
    """Skip a regional-compilation case on a diffusers without compile_repeated_blocks."""
    from lorafuse.integrations.compat import missing_diffusers_feature

    why = missing_diffusers_feature("regional_compile") if mode == "regional" else None
    if why:
        pytest.skip(why)


def compile_denoiser(pipe, family, mode, **kw):
    """Regional (diffusers' compile_repeated_blocks) or whole-module torch.compile, backend aot_eager."""
    kw.setdefault("backend", "aot_eager")
    if mode == "regional":
        denoiser(pipe).compile_repeated_blocks(**kw)
    else:
        setattr(pipe, COMPONENT[family], torch.compile(denoiser(pipe), **kw))


def graphs_and_breaks():
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def decisions(log):
    """(call, layer, subject gate, style gate) of a gate log, in layer order per call (a compiled
    graph's layers are recorded when its denoiser call ends, after the eager ones)."""
    return sorted((e["call"], e["layer_index"], e["subject"], e["style"]) for e in log)


def weights(pipe):
    d = denoiser(pipe)
    return {k: v.detach().clone() for k, v in getattr(d, "_orig_mod", d).state_dict().items()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def check_compiled(family, method, mode, order, **options):
    """Compiled vs eager lorafuse image, 0 graph breaks, 0 recompiles across runs with other step
    counts, the same gate log, and an exact undo."""
    need(mode)
    pipe = make(family)
    original = weights(pipe)
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", **options)
    eager = run(pipe, family, steps=3)
    eager_log = h.gate_log
    h.remove()
    if order == "before":
        compile_denoiser(pipe, family, mode, fullgraph=True)
        h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", **options)
    else:
        h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", **options)
        compile_denoiser(pipe, family, mode, fullgraph=True)
    assert h.summary()["path"] == ("fused" if method == "kl" else "merged")
    out = run(pipe, family, steps=3)
    graphs, breaks = graphs_and_breaks()
    assert graphs >= 1 and breaks == 0
    assert close(out, eager), (out - eager).abs().max()
    log = h.gate_log
    assert len(log) == len(eager_log) > 0
    assert decisions(log) == decisions(eager_log)
    run(pipe, family, steps=2)  # another step count, another run: the same graphs
    again = run(pipe, family, steps=3)
    assert graphs_and_breaks() == (graphs, 0)
    assert close(again, eager)
    h.remove()
    after = weights(pipe)
    assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
@pytest.mark.parametrize("mode", ["regional", "whole"])
@pytest.mark.parametrize("order", ["after", "before"])
def test_klora_compiled_reads_merged_weights(family, mode, order):
    check_compiled(family, "klora", mode, order)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
@pytest.mark.parametrize("method, options, mode, order", [
    ("est", {}, "regional", "after"),
    ("merge", {}, "whole", "before"),
    ("subject", {}, "regional", "before"),
    ("style", {}, "whole", "after"),
    ("klora", {"tau_mode": "official"}, "regional", "after"),
    ("klora", {"weights": "inplace"}, "whole", "after"),
    ("est", {"weights": "inplace", "tau_mode": "official"}, "regional", "before"),
])
def test_static_methods_compiled(family, method, options, mode, order):
    check_compiled(family, method, mode, order, **options)


@pytest.mark.parametrize("family, mode, order", [("flux", "regional", "after"), ("sdxl", "whole", "before")])
def test_kl_compiled_traces_its_statistics_and_decision(family, mode, order):
    """kl: the statistics and the decision run inside the graph (no graph break, one graph per block
    type); the gate log gets each layer call's gates and divergences from the graph."""
    check_compiled(family, "kl", mode, order)


def test_kl_compiled_gate_log_keeps_the_divergences():
    need("regional")
    family = "flux"
    pipe = make(family)
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    run(pipe, family, steps=2)
    eager = sorted((e["call"], e["layer_index"], e["kl"]) for e in h.gate_log)
    compile_denoiser(pipe, family, "regional", fullgraph=True)
    run(pipe, family, steps=2)
    out = sorted((e["call"] - 2, e["layer_index"], e["kl"]) for e in h.gate_log)  # the second run's calls
    h.remove()
    assert [k[:2] for k in out] == [k[:2] for k in eager] and len(out) > 0
    for (_, _, a), (_, _, b) in zip(out, eager):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-7)


class FlipKLoRA(KLoRA):
    """K-LoRA whose time scale makes every layer select the subject for tau <= 0.5 and the style after:
    every merged weight flips once per run."""

    def scale(self, tau):
        return 1e-9 if tau <= 0.5 else 1e9


@pytest.mark.parametrize("mode", ["regional", "whole"])
def test_a_flip_between_compiled_calls_is_read_by_the_graph(mode):
    need(mode)
    family = "flux"
    pipe = make(family)
    h = accelerate_fusion(pipe, "sbj", "sty", FlipKLoRA(), backend="torch", log_gates="all")
    eager = run(pipe, family, steps=4)
    h.remove()
    h = accelerate_fusion(pipe, "sbj", "sty", "subject", backend="torch")  # the run without the flip
    no_flip = run(pipe, family, steps=4)
    h.remove()
    h = accelerate_fusion(pipe, "sbj", "sty", FlipKLoRA(), backend="torch", log_gates="all")
    compile_denoiser(pipe, family, mode, fullgraph=True)
    out = run(pipe, family, steps=4)
    graphs, breaks = graphs_and_breaks()
    flips = {(e["call"], e["subject"]) for e in h.gate_log}
    h.remove()
    assert {s for _, s in flips} == {0.0, 1.0}  # both selections occurred within the run
    assert breaks == 0 and graphs >= 1
    assert not close(no_flip, eager)
    assert close(out, eager), (out - eager).abs().max()


def test_per_call_lora_scale_under_compile_keeps_the_result():
    """A per-call LoRA scale (diffusers scales PEFT's scalings inside the denoiser's forward) differs
    from the scalings W_eff was built with: the compiled layers take the fused path for it, and the
    image equals the eager one."""
    need("regional")
    family = "flux"
    pipe = make(family)
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    eager = run(pipe, family, steps=2, joint_attention_kwargs={"scale": 0.5})
    plain = run(pipe, family, steps=2)
    compile_denoiser(pipe, family, "regional")
    out = run(pipe, family, steps=2, joint_attention_kwargs={"scale": 0.5})
    out_plain = run(pipe, family, steps=2)
    h.remove()
    assert not close(eager, plain)
    assert close(out, eager) and close(out_plain, plain)


@pytest.mark.parametrize("method", ["klora", "kl"])
def test_covered_conv_layers_run_eagerly_inside_a_compiled_denoiser(method):
    """LoRA layers the kernels do not patch but the method covers (SD1.5's 1x1 conv LoRAs, a layer only
    the subject targets) run eagerly inside a compiled graph, one graph break per such layer call, so
    their per-call rule and log do not become guards: the same image and decisions as eager, and no
    recompile across runs with other step counts."""
    from .test_fallbacks import conv_pair

    pipe = conv_pair()
    pipe.set_progress_bar_config(disable=True)
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    eager = run(pipe, "sd15", steps=3)
    eager_log = decisions(h.gate_log)
    h.remove()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    compile_denoiser(pipe, "sd15", "whole")
    out = run(pipe, "sd15", steps=3)
    log = decisions(h.gate_log)
    graphs, breaks = graphs_and_breaks()
    run(pipe, "sd15", steps=2)
    again = run(pipe, "sd15", steps=3)
    h.remove()
    assert close(out, eager) and close(again, eager), (out - eager).abs().max()
    assert log == eager_log and any(e[1] >= h.num_layers for e in log)  # the covered layers are logged
    assert breaks > 0 and graphs_and_breaks()[0] == graphs
