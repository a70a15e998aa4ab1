"""Every decision is in the gate log (issue 21): replaying the log through PEFT's own forward
(:class:`GateReplay`) gives the fused image for every coverage policy and family, conv LoRA layers
(SD1.5's 1x1 proj_in / proj_out, kohya LoCon's 3x3 resnet convs) and layers only one adapter
targets included."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.integrations import accelerate_fusion  # noqa: E402

from .reference import GateReplay  # noqa: E402
from .test_fallbacks import conv_pair  # noqa: E402
from .tiny import (  # noqa: E402
    FLUX_TARGETS,
    MMDIT_TARGETS,
    denoiser,
    flux_pipeline,
    lora_state_dict,
    run,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    to_kohya,
)

# fp32 on the CPU; the tolerance scales with the values compared (the latents' magnitude)
ATOL, RTOL = {torch.float32: (2e-5, 1e-4)}[torch.float32]


def single_style(build, targets, style_skips):
    """``build()``'s pipeline with "sbj" on every target and "sty" on all but ``style_skips``: the
    layers of those targets hold only the subject adapter."""
    def make():
        pipe = build()
        d = denoiser(pipe)
        prefix = "unet" if hasattr(pipe, "unet") else "transformer"
        sbj = lora_state_dict(d, prefix, 4, seed=1, targets=targets)
        sty = lora_state_dict(d, prefix, 8, seed=2, targets=tuple(t for t in targets if t not in style_skips),
                              scale=0.12)
        pipe.load_lora_weights(sbj, adapter_name="sbj")
        pipe.load_lora_weights(sty, adapter_name="sty")
        return pipe

    return make


def locon_pair():
    """SD1.5 with two kohya LoCon files: attention linears, the resnets' 3x3 conv1 / conv2 and the
    1x1 proj_in / proj_out (lora_down (r, C_in, kh, kw), lora_up (C_out, r, 1, 1), alpha = rank)."""
    from torch import nn

    pipe = sd15_pipeline()
    files = {}
    for name, seed, r, scale in (("sbj", 1, 4, 0.1), ("sty", 2, 8, 0.08)):  # both before loading either
        sd = files[name] = to_kohya(lora_state_dict(pipe.unet, "unet", r, seed=seed, scale=scale), alpha=r)
        g = torch.Generator().manual_seed(10 + seed)
        for path, mod in pipe.unet.named_modules():
            if isinstance(mod, nn.Conv2d) and ("resnets" in path and path.endswith(("conv1", "conv2"))
                                               or path.endswith(("proj_in", "proj_out"))):
                base = "lora_unet_" + path.replace(".", "_")
                sd[f"{base}.lora_down.weight"] = torch.randn(r, mod.in_channels, *mod.kernel_size, generator=g) * scale
                sd[f"{base}.lora_up.weight"] = torch.randn(mod.out_channels, r, 1, 1, generator=g) * scale
                sd[f"{base}.alpha"] = torch.tensor(float(r))
    for name, sd in files.items():
        pipe.load_lora_weights(sd, adapter_name=name)
    return pipe


ATTN = ("to_q", "to_k", "to_v", "to_out.0")
PIPES = {  # case: (builder, family for run())
    "sd15-conv": (conv_pair, "sd15"),
    "sd15-locon": (locon_pair, "sd15"),
    "sdxl": (single_style(sdxl_pipeline, ATTN, ("to_out.0",)), "sdxl"),
    "sd3": (single_style(sd3_pipeline, MMDIT_TARGETS, ("to_out.0",)), "sd3"),
    "flux": (single_style(flux_pipeline, FLUX_TARGETS, ("to_out.0", "proj_mlp")), "flux"),
}


def fused_and_replayed(case, method, coverage, steps=2, **options):
    build, family = PIPES[case]
    pipe = build()
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", coverage=coverage, **options)
    out = run(pipe, family, steps)
    log = h.gate_log
    info = h.summary()
    h.remove()
    rep = GateReplay(pipe, log, ("sbj", "sty"))
    try:
        ref = run(pipe, family, steps)
        assert rep.misses == 0
    finally:
        rep.remove()
    return out, ref, log, info, h


@pytest.mark.parametrize("coverage", ["method", "peft", "none"])
@pytest.mark.parametrize("case", list(PIPES))
def test_replay_of_the_log_gives_the_fused_image(case, coverage):
    out, ref, log, info, h = fused_and_replayed(case, "klora", coverage)
    covered = sum(info["method_gates"].values()) + sum(info["no_lora"].values())
    assert covered == (0 if coverage == "peft" else sum(info["unpatched"].values())) > 0 or coverage == "peft"
    kinds = {}
    for e in log:
        kinds.setdefault((e["kind"], e.get("coverage")), set()).add(e["layer"])
    assert {k: len(v) for k, v in kinds.items() if k[0] == "linear"} == {("linear", None): h.num_layers}
    assert sum(len(v) for k, v in kinds.items() if k[0] != "linear") == covered
    assert all(c == coverage for _, c in kinds if c is not None)
    assert (out - ref).abs().max().item() <= ATOL + RTOL * ref.abs().max().item(), (out - ref).abs().max()


@pytest.mark.parametrize("method, options", [("kl", {}), ("merge", {"subject_weight": 0.8, "style_weight": 0.6}),
                                             ("est", {"D": 0.3})])
def test_replay_of_the_log_with_conv_layers_other_methods(method, options):
    """kl's per-sample decisions on the conv layers, merge's constant weights, est's selection."""
    out, ref, log, info, _ = fused_and_replayed("sd15-conv", method, "method", **options)
    conv = [e for e in log if e["kind"] == "conv"]
    assert conv and len({e["layer"] for e in conv}) == info["method_gates"]["not a linear LoRA (conv)"]
    if method == "kl":
        assert all(isinstance(e["subject"], list) and len(e["subject"]) == 2 for e in log)  # per sample (CFG)
    assert (out - ref).abs().max().item() <= ATOL + RTOL * ref.abs().max().item(), (out - ref).abs().max()
