"""Test helpers on top of the package's tiny pipelines (lorafuse.integrations.tiny)."""

from __future__ import annotations

import torch

from lorafuse.integrations.tiny import (  # noqa: F401  (re-exported for the tests)
    ATTN_TARGETS,
    FLUX_TARGETS,
    MMDIT_TARGETS,
    bytes_to_unicode,
    denoiser,
    flux_pipeline,
    lora_state_dict,
    peft_layers,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    tiny_clip_tokenizer,
    to_kohya,
)


def run_kwargs(family: str, steps: int = 2, **extra):
    """Call kwargs for a short, deterministic run returning latents."""
    g = torch.Generator().manual_seed(0)
    if family in ("sd15", "sdxl"):
        kw = dict(prompt="a photo of sks dog", num_inference_steps=steps, guidance_scale=6.0, height=32, width=32,
                  output_type="latent", generator=g)
    elif family == "sd3":
        e = torch.Generator().manual_seed(1)
        kw = dict(prompt_embeds=torch.randn(1, 7, 32, generator=e), pooled_prompt_embeds=torch.randn(1, 64, generator=e),
                  negative_prompt_embeds=torch.randn(1, 7, 32, generator=e),
                  negative_pooled_prompt_embeds=torch.randn(1, 64, generator=e), guidance_scale=5.0,
                  num_inference_steps=steps, height=16, width=16, output_type="latent", generator=g)
    elif family == "flux":
        e = torch.Generator().manual_seed(1)
        kw = dict(prompt_embeds=torch.randn(1, 7, 32, generator=e), pooled_prompt_embeds=torch.randn(1, 32, generator=e),
                  num_inference_steps=steps, height=16, width=16, output_type="latent", generator=g)
    else:
        raise ValueError(family)
    kw.update(extra)
    return kw


def run(pipe, family, steps=2, **extra):
    with torch.no_grad():
        return pipe(**run_kwargs(family, steps, **extra)).images


def load_two(pipe, family, r_sbj=4, r_sty=8, targets=None, subject_te=False):
    """Load "sbj" (rank r_sbj) and "sty" (rank r_sty) into the denoiser from in-memory dicts."""
    d = denoiser(pipe)
    prefix = "unet" if family in ("sd15", "sdxl") else "transformer"
    targets = targets or {"sd15": ATTN_TARGETS, "sdxl": ATTN_TARGETS, "sd3": MMDIT_TARGETS, "flux": FLUX_TARGETS}[family]
    te = pipe.text_encoder if subject_te else None
    sbj = lora_state_dict(d, prefix, r_sbj, seed=1, targets=targets, text_encoder=te)
    sty = lora_state_dict(d, prefix, r_sty, seed=2, targets=targets, scale=0.12)
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    return sbj, sty


def needs(feature: str):
    """Skip marker for a test of a diffusers feature that the installed diffusers / PEFT lack (the oldest
    releases setup.py admits): feature-detected, the reason names the release that introduced it."""
    import pytest

    from lorafuse.integrations.compat import missing_diffusers_feature

    why = missing_diffusers_feature(feature)
    return pytest.mark.skipif(why is not None, reason=why or "")


def sequential_offload(pipe) -> None:
    """accelerate's sequential offload of ``pipe.unet`` on the CPU (its weights on "meta", moved in per
    submodule call), as ``enable_sequential_cpu_offload`` does on an accelerator. The pipeline's other
    modules get an execution-device hook too: diffusers < 0.33 takes ``pipe.device`` from an unordered
    set of component names (PYTHONHASHSEED-dependent), and an offloaded unet first gives "meta"."""
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    cpu = torch.device("cpu")
    cpu_offload(pipe.unet, execution_device=cpu)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and module is not pipe.unet and not hasattr(module, "_hf_hook"):
            add_hook_to_module(module, AlignDevicesHook(execution_device=cpu, io_same_device=True))
