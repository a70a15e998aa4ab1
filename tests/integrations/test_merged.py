"""The merged-weight path of accelerate_fusion (weights="scratch" / "inplace") on the tiny pipelines.

References: the fused low-rank path of the same method (weights="off") and PEFT itself replaying
the logged decisions. Flips in the middle of a generation come from the real methods' schedules and
from a double that flips every layer twice (subject -> style -> subject, like "s*")."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.fusion.base import Decision  # noqa: E402
from lorafuse.integrations import accelerate_fusion  # noqa: E402

from .doubles import SwitchDouble  # noqa: E402
from .test_diffusers import close, make, replay  # noqa: E402
from .tiny import denoiser, needs, peft_layers, run, sequential_offload  # noqa: E402

MODES = ["scratch", "inplace"]


class TwoFlips(SwitchDouble):
    """Layer l uses the subject while tau < a_l, the style while a_l <= tau < b_l, then the subject
    again (two flips per layer in one generation); gates fixed per step, as K-LoRA's "s*"."""

    name = "two-flips"

    def prepare(self, layers, device=None):
        super().prepare(layers, device)
        self.lo = self.thr * 0.5

    def begin_step(self, progress):
        self.progress.append(progress)
        tau = torch.as_tensor(progress.tau, dtype=torch.float32, device=self.gates.device)
        self.tau = tau
        sub = ((tau < self.lo) | (tau >= self.thr)).float()
        self.gates.copy_(torch.stack([sub, 1 - sub], 1))

    def step_decisions(self):
        return Decision(self.gates, self.tau, {})

    def layer_gates(self, layer):
        return self.gates[layer], None


def flips(log):
    """Per layer, how often its decision changed over the denoiser calls of one generation."""
    by_layer = {}
    for e in sorted(log, key=lambda e: e["call"]):
        by_layer.setdefault(e["layer_index"], []).append(e["subject"])
    return [sum(a != b for a, b in zip(v, v[1:])) for v in by_layer.values()]


def weights_of(pipe):
    return {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,name,options,flip", [
    ("sd15", "klora", {"pattern": "s*"}, True), ("sdxl", "est", {}, False), ("sd3", "klora", {"pattern": "s"}, False),
    ("flux", "merge", {"subject_weight": 0.8, "style_weight": 0.6}, False),
    ("sd15", "klora", {"tau_mode": "official"}, True),
])
def test_merged_equals_fused_path_and_peft_replay(family, name, options, flip, mode):
    pipe = make(family)
    h = accelerate_fusion(pipe, "sbj", "sty", name, backend="torch", **options, weights="off")
    fused = run(pipe, family, steps=4)
    fused_log = h.gate_log
    h.remove()
    before = weights_of(pipe)
    h = accelerate_fusion(pipe, "sbj", "sty", name, backend="torch", **options, weights=mode)
    out = run(pipe, family, steps=4)
    log = h.gate_log
    assert h.fallbacks == {} and h._merged is not None
    assert [(e["layer_index"], e["subject"]) for e in log] == [(e["layer_index"], e["subject"]) for e in fused_log]
    if flip:
        assert max(flips(log)) >= 1  # decisions change in the middle of the generation
    h.remove()
    assert same_weights(weights_of(pipe), before)  # remove() after flips: every weight bit for bit
    assert close(out, fused), (out - fused).abs().max()
    assert close(out, replay(pipe, family, log, 4))


@pytest.mark.parametrize("mode", MODES)
def test_two_flips_per_layer_and_repeatable_generations(mode):
    pipe = make("sd15")
    before = weights_of(pipe)
    ref_method = TwoFlips()
    h = accelerate_fusion(pipe, "sbj", "sty", ref_method, backend="torch", weights="off")
    fused = run(pipe, "sd15", steps=6)
    h.remove()
    h = accelerate_fusion(pipe, "sbj", "sty", TwoFlips(), backend="torch", weights=mode,
                          log_gates="all")  # the first of ten runs' records
    outs = [run(pipe, "sd15", steps=6) for _ in range(10)]
    log = [e for e in h.gate_log if e["call"] < 6]
    assert max(flips(log)) == 2
    assert all(torch.equal(o, outs[0]) for o in outs)  # no drift across generations
    assert close(outs[0], fused)
    h.remove()
    assert same_weights(weights_of(pipe), before)


@pytest.mark.parametrize("mode", MODES)
def test_live_scales_and_batch_size_between_calls(mode):
    pipe = make("sd15")
    outs = {}
    for weights in ("off", mode):
        h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", weights=weights)
        outs[weights] = [
            run(pipe, "sd15", steps=3),
            run(pipe, "sd15", steps=3, cross_attention_kwargs={"scale": 0.4}),
            run(pipe, "sd15", steps=3, num_images_per_prompt=2),
        ]
        pipe.set_adapters(["sbj", "sty"], [0.5, 1.3])
        outs[weights].append(run(pipe, "sd15", steps=3))
        pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
        outs[weights].append(run(pipe, "sd15", steps=3))
        assert h.fallbacks == {}
        h.remove()
    for a, b in zip(outs[mode], outs["off"]):
        assert close(a, b), (a - b).abs().max()
    assert torch.equal(outs[mode][0], outs[mode][-1])
    assert not torch.equal(outs[mode][0], outs[mode][1])  # the scale did act


@pytest.mark.parametrize("mode", MODES)
def test_interrupted_call_leaves_no_half_merged_weight(mode):
    pipe = make("sd15")
    before = weights_of(pipe)
    h = accelerate_fusion(pipe, "sbj", "sty", TwoFlips(), backend="torch", weights=mode)
    fresh = run(pipe, "sd15", steps=6)

    def stop(pipe_, step, t, kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        run(pipe, "sd15", steps=6, callback_on_step_end=stop)
    assert torch.equal(run(pipe, "sd15", steps=6), fresh)
    h.remove()
    assert same_weights(weights_of(pipe), before)


def test_inplace_hands_the_original_to_peft():
    """In place mode: a fallback (adapters disabled), PEFT's own merge (fuse_lora) and a suspended
    block see the original weight, never W_eff; removal restores it exactly."""
    pipe = make("sd15")
    before = weights_of(pipe)
    pipe.disable_lora()
    plain = run(pipe, "sd15")
    pipe.enable_lora()
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", weights="inplace")
    fused = run(pipe, "sd15")
    assert not same_weights(weights_of(pipe), before)  # W_eff lives in the weights
    pipe.disable_lora()
    assert torch.equal(run(pipe, "sd15"), plain)
    pipe.enable_lora()
    assert torch.equal(run(pipe, "sd15"), fused)
    with h.suspended():
        peft_sum = run(pipe, "sd15")
    h.remove()
    assert same_weights(weights_of(pipe), before)
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    assert torch.equal(run(pipe, "sd15"), peft_sum)
    pipe.fuse_lora()
    fused_lora = run(pipe, "sd15")
    pipe.unfuse_lora()
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", weights="inplace")
    run(pipe, "sd15")
    pipe.fuse_lora()  # PEFT merges into the original, not into W_eff
    assert close(run(pipe, "sd15"), fused_lora)
    pipe.unfuse_lora()
    h.remove()


@pytest.mark.parametrize("method", ["klora", "est", "merge"])
def test_merged_layer_call_costs_one_linear(method):
    """Per call, a merged layer dispatches exactly the aten ops of its bare base layer."""
    from benchmarks.fusion_methods import count_ops

    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    run(pipe, "sd15", steps=1)
    _, m = next((n, m) for n, m in peft_layers(denoiser(pipe)) if n.endswith("attn1.to_q"))
    x = torch.randn(2, 16, m.in_features)
    with torch.no_grad():
        base_ops = count_ops(lambda: m.base_layer(x))
        m(x)
        assert count_ops(lambda: m(x)) == base_ops
    assert all(st.valid for st in h._merged.layers)
    h.remove()


def test_triton_grouped_rebuild_in_the_interpreter():
    """backend="triton" on a CPU (interpreter): the per-step rebuild is the grouped kernel."""
    from lorafuse.kernels._common import interpreter_active

    if not interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", TwoFlips(), backend="torch", weights="off")
    ref = run(pipe, "sd15", steps=3)
    h.remove()
    h = accelerate_fusion(pipe, "sbj", "sty", TwoFlips(), backend="triton", weights="scratch")
    out = run(pipe, "sd15", steps=3)
    assert h._merged.table is not None and all(r is not None for r in h._merged.table.rows)
    h.remove()
    assert close(out, ref, atol=1e-4), (out - ref).abs().max()


def test_bad_weights_option():
    pipe = make("sd15")
    with pytest.raises(ValueError, match=r"weights must be one of \('scratch', 'inplace', 'off'\)"):
        accelerate_fusion(pipe, "sbj", "sty", "klora", weights="device")


# ------------------------------------------------------------------------------------------------
# diffusers workflows that used to change the result silently (issue 13, the cases fixed so far)
# ------------------------------------------------------------------------------------------------
def test_failed_install_leaves_the_pipeline_as_it_was():
    pipe = make("sd15")
    unet = denoiser(pipe)
    layers = peft_layers(unet)
    state = [(dict(m.__dict__), list(m.active_adapters)) for _, m in layers]
    hooks = dict(unet._forward_pre_hooks)
    before = run(pipe, "sd15")
    with torch.no_grad():
        layers[3][1].lora_B["sty"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):  # the method's own error, not a KeyError from cleanup
        accelerate_fusion(pipe, "sbj", "sty", "klora")
    assert [(dict(m.__dict__), list(m.active_adapters)) for _, m in layers] == state
    assert dict(unet._forward_pre_hooks) == hooks
    with torch.no_grad():
        layers[3][1].lora_B["sty"].weight[0, 0] = 0.0
    assert run(pipe, "sd15").shape == before.shape


def test_compiled_before_fusion_is_fused():
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    ref = run(pipe, "sd15")
    h.remove()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    out = run(pipe, "sd15")
    assert h.calls == 2 and h.num_layers == len(peft_layers(pipe.unet._orig_mod))
    assert close(out, ref), (out - ref).abs().max()
    h.remove()


def test_scheduler_swapped_between_calls_official_tau():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    def official_run(pipe, swap_first):
        h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", tau_mode="official")
        if swap_first:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        out = run(pipe, "sd15", steps=3)
        log = h.gate_log
        h.remove()
        return out, log

    pipe = make("sd15")
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    ref, ref_log = official_run(pipe, swap_first=False)  # installed with DDIM from the start
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    out, log = official_run(pipe, swap_first=True)  # installed with Euler, swapped to DDIM before the call
    assert [e["method_tau"] for e in log] == [e["method_tau"] for e in ref_log]
    assert torch.equal(out, ref)


def _dora_pipe():
    from .tiny import lora_state_dict, sd15_pipeline

    pipe = sd15_pipeline()
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2, scale=0.12)
    for k in list(sty):
        if k.endswith("lora_B.weight"):
            sty[k.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(sty[k].shape[0]) + 0.5
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    return pipe


@pytest.mark.parametrize("case", ["dora", "offload"])
def test_fallbacks_keep_the_methods_result(case):
    """Layers the kernels cannot run fall back to PEFT's forward driven with the method's gates:
    the image equals PEFT replaying the logged decisions, not PEFT's sum of both adapters."""
    pipe = _dora_pipe() if case == "dora" else make("sd15")
    pipe.set_adapters(["sbj", "sty"])
    peft_sum = run(pipe, "sd15", steps=3)
    if case == "offload":
        pytest.importorskip("accelerate")
        sequential_offload(pipe)
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", pattern="s*")
    with pytest.warns(UserWarning, match="with the method's gates"):
        out = run(pipe, "sd15", steps=3)
    log = h.gate_log
    assert h.fallbacks and sum(h.fallbacks.values()) == len(log)
    h.remove()
    assert close(out, replay(pipe, "sd15", log, 3))
    assert not close(out, peft_sum)


def test_summary_reports_what_is_left_on_peft(caplog):
    from .tiny import lora_state_dict, sd15_pipeline

    pipe = sd15_pipeline()
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1, targets=targets)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2, targets=targets[:2])  # style only on q and k
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    n_sbj = len(peft_layers(pipe.unet, ("sbj",)))
    with caplog.at_level("INFO", logger="lorafuse"):
        h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    info = h.summary()
    assert info["layers"] == h.num_layers == n_sbj // 2 and info["path"] == "merged"
    assert info["unpatched"] == {"only the subject adapter targets it": n_sbj - h.num_layers}
    assert any("left on PEFT: " + f"{n_sbj - h.num_layers} (only the subject" in r.message for r in caplog.records)
    h.remove()


@needs("hotswap")
def test_hotswap_reprepares_and_moves_do_not_warn():
    """hotswap=True into the style adapter while fused gives what a fresh installation on the new
    LoRA gives; a dtype round trip of the denoiser warns of nothing; fuse_lora() before
    accelerate_fusion is a clear error, after it a warning (PEFT's merged sum runs)."""
    import warnings as w

    from .tiny import ATTN_TARGETS, lora_state_dict, sd15_pipeline

    def new_style(pipe_):
        return lora_state_dict(sd15_pipeline().unet, "unet", 8, seed=5, targets=ATTN_TARGETS, scale=0.12)

    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    before = run(pipe, "sd15", steps=3)
    pipe.load_lora_weights(new_style(pipe), adapter_name="sty", hotswap=True)
    with w.catch_warnings():
        w.simplefilter("error")  # no "weights changed" warning: the reload was seen for what it is
        out = run(pipe, "sd15", steps=3)
        pipe.unet.to(torch.float16)
        pipe.unet.to(torch.float32)
        run(pipe, "sd15", steps=3)
    h.remove()
    assert "load_lora_weights" not in pipe.__dict__
    ref_pipe = sd15_pipeline()
    ref_pipe.load_lora_weights(lora_state_dict(ref_pipe.unet, "unet", 4, seed=1, targets=ATTN_TARGETS), adapter_name="sbj")
    ref_pipe.load_lora_weights(new_style(ref_pipe), adapter_name="sty")
    h = accelerate_fusion(ref_pipe, "sbj", "sty", "klora", backend="torch")
    ref = run(ref_pipe, "sd15", steps=3)
    h.remove()
    assert close(out, ref), (out - ref).abs().max()
    assert not close(out, before)
    pipe.set_adapters(["sbj", "sty"])
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"fused into the weights.*unfuse_lora\(\) first"):
        accelerate_fusion(pipe, "sbj", "sty", "klora")
    pipe.unfuse_lora()
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    pipe.fuse_lora()
    with pytest.warns(UserWarning, match="adapters merged"):
        run(pipe, "sd15")
    pipe.unfuse_lora()
    h.remove()


def test_merge_weights_the_text_encoder_loras_too():
    """merge(subject_weight, style_weight) equals set_adapters([...], [w_c, w_s]) with text-encoder
    LoRAs loaded (both scalings weighted, restored on remove)."""
    pipe = make("sd15", subject_te=True)
    te_layers = peft_layers(pipe.text_encoder, ("sbj",))
    assert te_layers
    scalings = [dict(m.scaling) for _, m in te_layers]
    pipe.set_adapters(["sbj", "sty"], [0.8, 0.6])
    ref = run(pipe, "sd15")
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    h = accelerate_fusion(pipe, "sbj", "sty", "merge", backend="torch", subject_weight=0.8, style_weight=0.6)
    out = run(pipe, "sd15")
    h.remove()
    assert close(out, ref), (out - ref).abs().max()
    assert [dict(m.scaling) for _, m in te_layers] == scalings


def test_preparation_progress_bar_follows_the_pipeline_setting(monkeypatch):
    """A preparation slower than a second shows a tqdm bar unless the pipeline's bars are disabled."""
    import tqdm.auto

    shown = []

    class Bar:
        def __init__(self, iterable, total, desc, **kw):
            shown.append((desc, total, kw.get("delay")))
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    pipe = make("sd15")
    pipe.set_progress_bar_config(disable=False)
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    assert shown == [("lorafuse: klora statistics", h.num_layers, 1.0)]
    h.remove()
    pipe.set_progress_bar_config(disable=True)
    accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch").remove()
    assert len(shown) == 1
