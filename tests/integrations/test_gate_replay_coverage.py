"""Every decision is in the gate log (issue 21): replaying the log through PEFT's own forward
(:class:`GateReplay`) gives the fused image for every coverage policy and family, conv LoRA layers
(SD1.5's 1x1 proj_in / proj_out) and layers only one adapter targets included."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.integrations import accelerate_fusion  # noqa: E402

from .reference import GateReplay  # noqa: E402
from .test_fallbacks import conv_pair  # noqa: E402
from .tiny import FLUX_TARGETS, MMDIT_TARGETS, denoiser, flux_pipeline, lora_state_dict, run, sd3_pipeline, sdxl_pipeline  # noqa: E402,E501

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


ATTN = ("to_q", "to_k", "to_v", "to_out.0")
PIPES = {  # case: (builder, family for run())
    "sd15-conv": (conv_pair, "sd15"),
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
