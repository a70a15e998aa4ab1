"""Tiny, offline, random-init diffusers pipelines and LoRA state dicts: what ``lorafuse demo`` runs
on and what the tests build (configs as in diffusers' own tests; no downloads, no weights).

``sd15_pipeline(size="tiny")`` is the tests' UNet; ``size="small"`` is a wider one for the demo's
timings. ``lora_state_dict`` makes a diffusers/PEFT-format LoRA for every targeted linear.
"""


from __future__ import annotations

import re

import torch
from torch import nn

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MMDIT_TARGETS = ATTN_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_TARGETS = MMDIT_TARGETS + ("proj_mlp", "proj_out", "ff.net.2")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(model_max_length=77):
    from .compat import clip_tokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in bytes_to_unicode():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return clip_tokenizer(vocab, [], model_max_length=model_max_length)


def _clip_config(hidden=32, projection_dim=None):
    from transformers import CLIPTextConfig

    kw = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000)
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _tiny_vae(latent_channels=4, blocks=(8,)):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=list(blocks), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(blocks), up_block_types=["UpDecoderBlock2D"] * len(blocks),
        latent_channels=latent_channels, norm_num_groups=1, layers_per_block=1,
    )


SD15_SIZES = {
    # size: (UNet block_out_channels, cross-attention / text width, UNet norm groups)
    "tiny": ((32, 64), 32, 8),
    "small": ((64, 128), 64, 32),
}


def sd15_pipeline(size: str = "tiny"):
    """SD1.5-like: a two-level UNet with one cross-attention level, DDIM, CLIP text encoder.
    ``size`` "tiny" (UNet (32, 64), text width 32: the tests') or "small" ((64, 128), 64: the demo)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if size not in SD15_SIZES:
        raise ValueError(f"sd15_pipeline: size must be one of {sorted(SD15_SIZES)}, got {size!r}")
    blocks, width, groups = SD15_SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=blocks, layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, norm_num_groups=groups,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(0)
    te = CLIPTextModel(_clip_config(hidden=width))
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=_tiny_vae(), text_encoder=te, tokenizer=tiny_clip_tokenizer(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline():
    """SDXL-like: two text encoders, text_time add_embedding, linear projections, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    te = CLIPTextModel(_clip_config())
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(_clip_config(projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=_tiny_vae(), text_encoder=te, text_encoder_2=te2,
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline():
    """SD3-like MMDiT (2 joint blocks, the last context_pre_only), FlowMatch; prompt embeds passed in."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    """FLUX-like: 1 double + 1 single block, FlowMatch with dynamic shifting; prompt embeds passed in."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    pipe = FluxPipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(latent_channels=1),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer



def lora_state_dict(model, prefix, rank, seed, targets=ATTN_TARGETS, scale=0.1, alpha=None, text_encoder=None):
    """diffusers/PEFT-format LoRA dict ``{prefix}.{path}.lora_A/B.weight`` for every targeted nn.Linear.
    Build every dict before the first load (loaded targets are no longer nn.Linear)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.endswith(targets) and not name.endswith("norm_out.linear"):
            sd[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * scale
            sd[f"{prefix}.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * scale
    if text_encoder is not None:
        for name, mod in text_encoder.named_modules():
            if isinstance(mod, nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * scale
                sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * scale
    return sd



def to_kohya(sd: dict, alpha: float) -> dict:
    """diffusers-format unet dict -> kohya keys ``lora_unet_<path with _>.lora_down/lora_up.weight`` + alpha."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"unet\.(.+)\.lora_([AB])\.weight$", k)
        assert m, k
        base = "lora_unet_" + m.group(1).replace(".", "_")
        out[f"{base}.{'lora_down' if m.group(2) == 'A' else 'lora_up'}.weight"] = v.clone()
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out



def peft_layers(model, names=("sbj", "sty")):
    from peft.tuners.lora.layer import Linear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and all(a in m.lora_A for a in names)]
