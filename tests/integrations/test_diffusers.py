"""accelerate_fusion on tiny, offline, random-init SD1.5 / SDXL / SD3 / FLUX pipelines.

Equality references are PEFT's own forward: "merge" against set_adapters weights, the selecting
methods against PEFT with only the logged adapter active in each (layer, call), "kl" against the same
replay of its per-sample decisions and against the method's two-pass reference mode.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.integrations import FusionFallbackWarning, FusionHandle, accelerate_fusion, remove_fusion  # noqa: E402

from .doubles import SwitchDouble  # noqa: E402
from .reference import GateReplay  # noqa: E402
from .tiny import (  # noqa: E402
    denoiser,
    flux_pipeline,
    load_two,
    lora_state_dict,
    peft_layers,
    run,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    sequential_offload,
    to_kohya,
)

BUILD = {"sd15": sd15_pipeline, "sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline}
ATOL = 2e-5


def make(family, **kw):
    pipe = BUILD[family]()
    load_two(pipe, family, **kw)
    return pipe


def close(a, b, atol=ATOL):
    return (a - b).abs().max().item() <= atol + 1e-4 * b.abs().max().item()


def replay(pipe, family, log, steps, **kw):
    rep = GateReplay(pipe, log)
    try:
        out = run(pipe, family, steps, **kw)
        assert rep.misses == 0
        return out
    finally:
        rep.remove()


def expected_tau(pipe, family):
    ts = pipe.scheduler.timesteps.float()
    div = 1000.0 if family in ("sd3", "flux") else float(pipe.scheduler.config.num_train_timesteps)
    return (1 - ts / div).clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# plumbing on every family (test double: per-layer switch at tau thresholds)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_family_tau_replay_and_removal(family):
    pipe = make(family)
    before = run(pipe, family)
    method = SwitchDouble()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    assert h.num_layers == len(peft_layers(denoiser(pipe))) > 0
    out = run(pipe, family, steps=3)
    # tau comes from the real timestep of every denoiser call
    taus = torch.stack([torch.as_tensor(p.tau).float() for p in method.progress])
    exp = expected_tau(pipe, family)
    calls_per_step = len(taus) // len(exp)
    assert calls_per_step == 1 and torch.allclose(taus, exp, atol=2e-3 if family == "flux" else 1e-6)
    assert [p.step for p in method.progress] == list(range(len(exp)))
    assert all(p.num_steps == 3 for p in method.progress)
    assert h.fallbacks == {}
    log = h.gate_log
    assert len(log) == h.num_layers * 3
    e = log[0]
    assert set(e) >= {"layer", "call", "timestep", "tau", "subject", "style", "threshold"}
    assert isinstance(e["subject"], float) and isinstance(e["tau"], float)
    h.remove()
    h.remove()  # idempotent
    assert not remove_fusion(pipe)
    assert all("forward" not in m.__dict__ for _, m in peft_layers(denoiser(pipe)))
    assert torch.equal(run(pipe, family), before)
    assert close(out, replay(pipe, family, log, 3))


# ------------------------------------------------------------------------------------------------
# the real methods
# ------------------------------------------------------------------------------------------------
def _merge_reference(pipe, family, w, **kw):
    pipe.set_adapters(["sbj", "sty"], [w[0], w[1]])
    try:
        return run(pipe, family, 2, **kw)
    finally:
        pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])


MERGE_W = (0.8, 0.6)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_merge_equals_set_adapters(family):
    pipe = make(family)
    scale_kw = ({"joint_attention_kwargs": {"scale": 0.3}} if family in ("sd3", "flux")
                else {"cross_attention_kwargs": {"scale": 0.3}})
    ref = _merge_reference(pipe, family, MERGE_W)
    ref_scaled = _merge_reference(pipe, family, MERGE_W, **scale_kw)
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    h = accelerate_fusion(pipe, "sbj", "sty", "merge", backend="torch", **_merge_options(MERGE_W))
    out = run(pipe, family)
    assert close(out, ref), (out - ref).abs().max()
    assert close(run(pipe, family, **scale_kw), ref_scaled)
    assert h.fallbacks == {}
    h.remove()


def _merge_options(w):
    return {"subject_weight": w[0], "style_weight": w[1]}


@pytest.mark.parametrize("family,name", [("sd15", "klora"), ("sdxl", "klora"), ("sd3", "est"), ("flux", "klora"),
                                         ("sd15", "est")])
def test_selecting_methods_equal_peft_with_selected_adapter(family, name):
    pipe = make(family)
    h = accelerate_fusion(pipe, "sbj", "sty", name, backend="torch")
    out = run(pipe, family, steps=3)
    log = h.gate_log
    assert len(log) == 3 * h.num_layers and h.fallbacks == {}
    for e in log:
        assert sorted([e["subject"], e["style"]]) == [0.0, 1.0]
    h.remove()
    assert close(out, replay(pipe, family, log, 3))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_kl_equals_replay_and_two_pass(family):
    pipe = make(family)
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    out = run(pipe, family, steps=2)
    log = h.gate_log
    assert isinstance(log[0]["subject"], list)
    h.remove()
    assert close(out, replay(pipe, family, log, 2))
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch", mode="two_pass")
    ref = run(pipe, family, steps=2)
    two_log = h.gate_log
    h.remove()
    assert close(out, ref)
    assert [e["subject"] for e in two_log] == [e["subject"] for e in log]


@pytest.mark.parametrize("name", ["merge", "klora", "kl"])
def test_triton_interpreter_backend_smallest_pipeline(name):
    pytest.importorskip("triton")
    pipe = make("sd15")
    opts = _merge_options(MERGE_W) if name == "merge" else {}
    h = accelerate_fusion(pipe, "sbj", "sty", name, backend="triton", **opts)
    out = run(pipe, "sd15", steps=1)
    log = h.gate_log
    h.remove()
    if name == "merge":
        pipe.set_adapters(["sbj", "sty"], list(MERGE_W))
        ref = run(pipe, "sd15", steps=1)
    else:
        ref = replay(pipe, "sd15", log, 1)
    assert close(out, ref, atol=1e-4), (out - ref).abs().max()


def test_kl_identical_calls_give_bit_identical_images(tmp_path):
    """Two identical pipeline calls with kl (the demo's LoRAs, whose decisions differ by sample and
    layer) give the same latents bit for bit, and the handle starts the method's per-run state afresh
    (``set_run_state(None)``) once per pipeline call (before its first denoiser call), not per
    denoiser call. The Triton path, whose speculative gates carry over from call to call, is checked
    bit for bit after reset() in tests/fusion/test_kl.py and per run in test_serving.py."""
    from lorafuse.commands.demo import write_loras
    from lorafuse.integrations.tiny import sd15_pipeline as demo_sd15

    pipe = demo_sd15("tiny")
    subject, style = write_loras(pipe, tmp_path)
    pipe.load_lora_weights(str(subject), adapter_name="subject")
    pipe.load_lora_weights(str(style), adapter_name="style")
    h = accelerate_fusion(pipe, "subject", "style", "kl", backend="torch", log_gates="all")  # both runs' records
    events = []
    fresh, begin = h.method.set_run_state, h.method.begin_step
    h.method.set_run_state = lambda state: (events.append("reset" if state is None else "resume"), fresh(state))[1]
    h.method.begin_step = lambda p: (events.append("step"), begin(p))[1]
    first = run(pipe, "sd15", steps=2)
    log = list(h.gate_log)
    assert any(0.0 in e["subject"] for e in log) and any(1.0 in e["subject"] for e in log)
    second = run(pipe, "sd15", steps=2)
    log2 = h.gate_log[len(log):]
    h.remove()
    assert torch.equal(first, second), (first - second).abs().max()
    assert events == ["reset", "step", "step"] * 2
    assert [e["subject"] for e in log2] == [e["subject"] for e in log]


# ------------------------------------------------------------------------------------------------
# LoRA files: diffusers and kohya safetensors
# ------------------------------------------------------------------------------------------------
def test_safetensors_diffusers_and_kohya(tmp_path):
    from safetensors.torch import save_file

    pipe = sd15_pipeline()
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2)
    save_file(sbj, str(tmp_path / "sbj.safetensors"))
    save_file(to_kohya(sty, alpha=4.0), str(tmp_path / "sty_kohya.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="sbj.safetensors", adapter_name="sbj")
    pipe.load_lora_weights(str(tmp_path), weight_name="sty_kohya.safetensors", adapter_name="sty")
    layer = peft_layers(pipe.unet)[0][1]
    assert layer.scaling["sty"] == pytest.approx(0.5)  # kohya alpha / rank survives
    pipe.set_adapters(["sbj", "sty"])
    ref = run(pipe, "sd15")
    method = SwitchDouble()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", log_gates="all")  # both runs' records
    run(pipe, "sd15", steps=3)
    out3 = run(pipe, "sd15", steps=3)  # a second run: progress.step restarts with set_timesteps
    log = h.gate_log
    assert [e["call"] for e in log[:: h.num_layers]] == list(range(6))
    assert [p.step for p in method.progress] == [0, 1, 2, 0, 1, 2]
    h.remove()
    assert close(out3, replay(pipe, "sd15", log[len(log) // 2:], 3))
    assert torch.equal(run(pipe, "sd15"), ref)


# ------------------------------------------------------------------------------------------------
# live PEFT state, fallbacks
# ------------------------------------------------------------------------------------------------
def _switch_all(method_gates_subject: bool):
    """A double whose gates are all-subject (True) or all-style (False) for every call."""

    class Fixed(SwitchDouble):
        def begin_step(self, progress):
            self.progress.append(progress)
            self.gates.zero_()
            self.gates[:, 0 if method_gates_subject else 1] = 1.0

    return Fixed()


def test_live_state_weights_scale_and_tensor_scaling():
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", _switch_all(False), backend="torch")
    # style only: equals PEFT with only "sty" active, under set_adapters weights and per-call scale
    pipe.set_adapters(["sbj", "sty"], [1.0, 0.5])
    out = run(pipe, "sd15")
    scaled = run(pipe, "sd15", cross_attention_kwargs={"scale": 0.3})
    assert h.fallbacks == {}
    # 0-d tensor scalings (as after enable_lora_hotswap) are read live as well
    for _, m in peft_layers(pipe.unet):
        m.scaling["sty"] = torch.tensor(float(m.scaling["sty"]))
    out_t = run(pipe, "sd15")
    h.remove()
    pipe.set_adapters("sty", 0.5)
    assert close(out, run(pipe, "sd15"))
    assert close(out_t, out)
    assert close(scaled, run(pipe, "sd15", cross_attention_kwargs={"scale": 0.3}))


def _fallback_run(pipe, h):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = run(pipe, "sd15")
    msgs = [str(x.message) for x in w if issubclass(x.category, FusionFallbackWarning)]
    return out, msgs


def test_fallback_one_adapter_disabled_merged():
    pipe = make("sd15")
    pipe.set_adapters(["sbj", "sty"])
    both = run(pipe, "sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch")
    pipe.set_adapters("sbj")
    out, msgs = _fallback_run(pipe, h)
    assert len(msgs) == 1 and "two fused adapters" in msgs[0]
    pipe.disable_lora()
    base, msgs = _fallback_run(pipe, h)
    assert msgs == [] and h.fallbacks.get("adapters disabled")
    pipe.enable_lora()
    pipe.set_adapters(["sbj", "sty"])
    pipe.fuse_lora(components=["unet"], adapter_names=["sbj", "sty"])
    fused, _ = _fallback_run(pipe, h)
    assert h.fallbacks.get("adapters merged")
    pipe.unfuse_lora(components=["unet"])  # (unfuse is lossy: compare with a tolerance from here on)
    h.remove()
    assert close(fused, both, atol=1e-4)
    pipe.set_adapters("sbj")
    assert close(out, run(pipe, "sd15"))
    pipe.disable_lora()
    assert close(base, run(pipe, "sd15"))


def test_fallback_dora_matches_peft():
    pipe = sd15_pipeline()
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2)
    for k in list(sty):
        if k.endswith("lora_B.weight"):
            sty[k.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(sty[k].shape[0]) + 0.5
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    pipe.set_adapters(["sbj", "sty"])
    ref = run(pipe, "sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch")
    out, msgs = _fallback_run(pipe, h)
    assert len(msgs) == 1 and "DoRA" in msgs[0]
    assert torch.equal(out, ref)
    h.remove()


def test_fallback_sequential_offload_meta_weights():
    pytest.importorskip("accelerate")
    pipe = make("sd15")
    pipe.set_adapters(["sbj", "sty"])
    ref = run(pipe, "sd15")
    sequential_offload(pipe)
    assert peft_layers(pipe.unet)[0][1].base_layer.weight.is_meta
    method = SwitchDouble()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    assert not method.layers[0].subject[0].is_meta  # prepare saw the offloaded copies, not meta
    out, msgs = _fallback_run(pipe, h)
    assert len(msgs) == 1 and "offload" in msgs[0]
    assert torch.equal(out, ref)
    h.remove()


def test_fallback_adapter_names_and_autograd():
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch")
    _, layer = peft_layers(pipe.unet)[0]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        pipe.unet(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=torch.randn(1, 77, 32))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = layer(x, adapter_names=["sbj", "sty"])
            assert torch.equal(y, type(layer).forward(layer, x, adapter_names=["sbj", "sty"]))
    with warnings.catch_warnings(record=True) as w2:
        warnings.simplefilter("always")
        layer(x)  # grad enabled, LoRA params trainable
    assert any("adapter_names" in str(m.message) for m in w)
    assert any("autograd" in str(m.message) for m in w2)
    h.remove()


# ------------------------------------------------------------------------------------------------
# handle life cycle, logging, errors
# ------------------------------------------------------------------------------------------------
def test_reinstall_replaces_and_unload_is_safe(tmp_path):
    pipe = make("sd15")
    pipe.set_adapters(["sbj", "sty"])
    ref = run(pipe, "sd15")
    h1 = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch")
    h2 = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch", log_gates=False)
    assert not h1.active and h2.active and isinstance(h2, FusionHandle)
    assert len(pipe.unet._forward_pre_hooks) == 0 or all(
        getattr(f, "__name__", "") == "pre_hook" for f in pipe.unet._forward_pre_hooks.values())
    assert len(pipe.unet._forward_pre_hooks) == 1
    run(pipe, "sd15")
    assert h2.gate_log == [] and h2.calls == 2
    assert remove_fusion(pipe) and not h2.active
    assert torch.equal(run(pipe, "sd15"), ref)
    h3 = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch")
    run(pipe, "sd15")
    h3.plot_gates(tmp_path / "gates.png")
    assert (tmp_path / "gates.png").stat().st_size > 0
    pipe.unload_lora_weights()
    h3.remove()
    h3.remove()
    assert not remove_fusion(pipe)
    run(pipe, "sd15")


def test_errors():
    pipe = make("sd15")
    with pytest.raises(ValueError, match=r"'nope' is not loaded.*\['sbj', 'sty'\]"):
        accelerate_fusion(pipe, "nope", "sty", SwitchDouble())
    with pytest.raises(ValueError, match="different"):
        accelerate_fusion(pipe, "sbj", "sbj", SwitchDouble())
    with pytest.raises(TypeError):
        accelerate_fusion(pipe, "sbj", "sty", 42)
    with pytest.raises(ValueError, match="denoiser"):
        accelerate_fusion(object(), "sbj", "sty", SwitchDouble())
    one = sd15_pipeline()
    one.load_lora_weights(lora_state_dict(one.unet, "unet", 4, seed=1), adapter_name="sbj")
    with pytest.raises(ValueError, match="two LoRA adapters"):
        accelerate_fusion(one, "sbj", "sty", SwitchDouble())
    disjoint = sd15_pipeline()
    a = lora_state_dict(disjoint.unet, "unet", 4, seed=1, targets=("to_q",))
    b = lora_state_dict(disjoint.unet, "unet", 4, seed=2, targets=("to_k",))
    disjoint.load_lora_weights(a, adapter_name="sbj")
    disjoint.load_lora_weights(b, adapter_name="sty")
    with pytest.raises(ValueError, match="no common"):
        accelerate_fusion(disjoint, "sbj", "sty", SwitchDouble())
    assert all("forward" not in m.__dict__ for m in disjoint.unet.modules())
    fusion = pytest.importorskip("lorafuse.fusion")
    if hasattr(fusion, "get_method"):
        with pytest.raises((ValueError, KeyError)):
            accelerate_fusion(pipe, "sbj", "sty", "no-such-method")
        with pytest.raises((TypeError, ValueError)):
            accelerate_fusion(pipe, "sbj", "sty", "klora", no_such_option=1)
        assert not any("forward" in m.__dict__ for m in pipe.unet.modules())


def test_import_lorafuse_does_not_import_diffusers():
    code = "import sys, lorafuse, lorafuse.integrations; print('diffusers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_tau_from_real_timestep_heun_and_img2img():
    from diffusers import HeunDiscreteScheduler, StableDiffusionImg2ImgPipeline

    pipe = make("sd15")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(float(a[1])))
    method = SwitchDouble()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    run(pipe, "sd15", steps=3)
    assert len(seen) == len(method.progress) == 5  # Heun: two denoiser calls per step but the last
    taus = [float(p.tau) for p in method.progress]
    assert taus == pytest.approx([1 - t / 1000 for t in seen], abs=1e-6)
    assert [p.step for p in method.progress] == list(range(5))
    h.remove()
    hook.remove()

    img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    img.set_progress_bar_config(disable=True)
    seen.clear()
    hook = img.unet.register_forward_pre_hook(lambda m, a: seen.append(float(a[1])))
    method = SwitchDouble()
    h = accelerate_fusion(img, "sbj", "sty", method, backend="torch")
    with torch.no_grad():
        img(prompt="x", image=torch.zeros(1, 3, 32, 32), strength=0.5, num_inference_steps=4, guidance_scale=1.0,
            output_type="latent", generator=torch.Generator().manual_seed(0))
    taus = [float(p.tau) for p in method.progress]
    assert taus == pytest.approx([1 - t / 1000 for t in seen], abs=1e-6) and min(taus) > 0.3
    h.remove()
    hook.remove()


def test_torch_compile_no_recompiles_between_runs():
    """CPU smoke test (counting backend, no Inductor): the patched denoiser compiles, matches eager,
    and a second run with new timesteps reuses the graphs (gates are device tensors, host
    bookkeeping runs in the eager pre-hook)."""
    import torch._dynamo.testing

    pipe = make("sd3")
    h = accelerate_fusion(pipe, "sbj", "sty", SwitchDouble(), backend="torch")
    eager = run(pipe, "sd3", steps=3)
    cnt = torch._dynamo.testing.CompileCounter()
    pipe.transformer.compile(backend=cnt)
    try:
        out = run(pipe, "sd3", steps=3)
        frames = cnt.frame_count
        assert frames > 0 and close(out, eager)
        out2 = run(pipe, "sd3", steps=3)
        assert cnt.frame_count == frames and close(out2, eager)
    finally:
        h.remove()
        torch._dynamo.reset()


def test_klora_official_mode_gate_log_matches_counter_schedule():
    from lorafuse.fusion import official_tau

    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", tau_mode="official",
                          log_gates="all")  # the three runs' records
    steps = 3
    run(pipe, "sd15", steps=steps)
    run(pipe, "sd15", steps=steps)  # a new run restarts the counter (set_timesteps)
    log = h.gate_log
    L = h.num_layers
    assert len(log) == 2 * steps * L
    for c in range(2 * steps):
        entries = log[c * L: (c + 1) * L]
        # layers are indexed in execution order (UNet: down, mid, up), as the official counter counts
        assert [e["layer_index"] for e in entries] == list(range(L))
        for pos, e in enumerate(entries, start=1):
            assert e["call"] == c
            assert e["method_tau"] == pytest.approx(official_tau(c % steps, pos, L, steps), abs=1e-12)
            subject = e["subject_score"] > e["style_score"] * e["time_scale"]
            assert (e["subject"], e["style"]) == ((1.0, 0.0) if subject else (0.0, 1.0))
    out = run(pipe, "sd15", steps=steps)
    log3 = h.gate_log[2 * steps * L:]
    h.remove()
    assert close(out, replay(pipe, "sd15", log3, steps))


@pytest.mark.parametrize("name, options", [("klora", {}), ("est", {"D": 0.3}), ("merge", _merge_options(MERGE_W))])
def test_per_step_snapshot_log_equals_per_layer_log(name, options):
    """Methods that decide once per step log one snapshot per denoiser call (step_decisions); the log
    must equal, entry for entry, the per-layer-call log (last_decision after every layer), also when
    it is read in the middle of a run."""
    from lorafuse.fusion import get_method

    class PerLayer(type(get_method(name))):
        def step_decisions(self):
            return None

    pipe = make("sd15")
    logs = []
    for method in (get_method(name, **options), PerLayer(**options)):
        h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
        seen = []
        # a read between denoiser calls, while records of the previous call are pending
        run(pipe, "sd15", steps=3, callback_on_step_end=lambda p, i, t, kw: seen.append(len(h.gate_log)) or kw)
        logs.append((h.gate_log, seen))
        h.remove()
    (fast, seen_fast), (slow, seen_slow) = logs
    assert seen_fast == seen_slow and len(fast) == len(slow) == 3 * len(peft_layers(denoiser(pipe)))
    assert fast == slow
    assert {"subject", "style", "tau", "layer", "call"} <= set(fast[0])


def test_suspended_runs_peft_and_counts_nothing():
    pipe = make("sd15")
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    peft_out = run(pipe, "sd15")  # PEFT with both adapters active, no lorafuse
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    fused = run(pipe, "sd15")
    calls, logged = h.calls, len(h.gate_log)
    with h.suspended():
        assert torch.equal(run(pipe, "sd15"), peft_out)
    assert (h.calls, len(h.gate_log)) == (calls, logged) and h.fallbacks == {}
    assert torch.equal(run(pipe, "sd15"), fused)
    h.remove()
