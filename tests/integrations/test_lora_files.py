"""LoRA files: load_lora_layers / load_lora_pair against what diffusers itself loads for the same
file (``pipe.load_lora_weights`` then PEFT's lora_A / lora_B / scaling per module), in each key
format, and a clear ValueError naming the file (and the key) for each kind of bad file."""

from __future__ import annotations

import re
import struct
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402

from lorafuse.integrations import LoRAPair, fuse_modules, load_lora_layers, load_lora_pair  # noqa: E402
from lorafuse.integrations.lora_files import check_against_model, detect_format  # noqa: E402

from .tiny import (  # noqa: E402
    ATTN_TARGETS,
    FLUX_TARGETS,
    MMDIT_TARGETS,
    flux_pipeline,
    lora_state_dict,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    to_kohya,
)


# ------------------------------------------------------------------------------------------------
# writers of the key formats (from a freshly built, not yet LoRA-wrapped, denoiser)


def save(tmp_path, name, sd):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def with_text_encoder(pipe, sd, kohya_alpha=None, seed=7):
    """Add CLIP q/k/v/out LoRA keys (diffusers ``text_encoder.*`` or kohya ``lora_te_*``): the loader
    must drop them (text encoders stay on PEFT)."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(sd)
    for name, mod in pipe.text_encoder.named_modules():
        if isinstance(mod, nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            A, B = torch.randn(4, mod.in_features, generator=g), torch.randn(mod.out_features, 4, generator=g)
            if kohya_alpha is None:
                sd[f"text_encoder.{name}.lora_A.weight"], sd[f"text_encoder.{name}.lora_B.weight"] = A, B
            else:
                base = "lora_te_" + name.replace(".", "_")
                sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = A, B
                sd[f"{base}.alpha"] = torch.tensor(float(kohya_alpha))
    return sd


def to_attn_procs(sd):
    """diffusers/PEFT unet keys -> the old attention-processor keys ``...attn1.processor.to_q_lora.down.weight``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"unet\.(.+)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight$", k)
        assert m, k
        out[f"unet.{m.group(1)}.processor.{m.group(2).replace('.0', '')}_lora.{'down' if m.group(3) == 'A' else 'up'}.weight"] = v
    return out


def sgm_path(path, layers_per_block):
    """diffusers UNet attention path -> SGM (original SDXL) block name, as kohya writes SDXL LoRAs."""
    n = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + int(m.group(1)) * n + int(m.group(2))}.1.{m.group(3)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m.group(1)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(m.group(1)) * n + int(m.group(2))}.1.{m.group(3)}"
    raise AssertionError(path)


def sdxl_kohya(unet, rank, seed, alpha):
    """kohya SDXL file: ``lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight``,
    ``.alpha``, for every linear of the transformer blocks (attn1/attn2 q/k/v/out, ff) and proj_in/out.
    ``alpha`` is a number or a function of the diffusers path."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, nn.Linear) and ".attentions." in name and name.endswith(ATTN_TARGETS + ("proj_in", "proj_out", "ff.net.2")):
            base = "lora_unet_" + sgm_path(name, unet.config.layers_per_block).replace(".", "_")
            sd[f"{base}.lora_down.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
            sd[f"{base}.lora_up.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
            sd[f"{base}.alpha"] = torch.tensor(float(alpha(name) if callable(alpha) else alpha))
    return sd


def flux_kohya(tr, rank, seed, alpha, linear1=False):
    """kohya (sd-scripts) FLUX file: BFL names ``lora_unet_double_blocks_0_img_attn_qkv`` (fused q/k/v),
    ``..._img_attn_proj``, ``..._txt_*``, ``..._img_mlp_0/2``, ``lora_unet_single_blocks_0_linear2`` (and
    ``linear1``: fused q/k/v/mlp, which diffusers splits with FLUX.1's hard-coded 3072 widths only)."""
    g = torch.Generator().manual_seed(seed)
    D = tr.config.num_attention_heads * tr.config.attention_head_dim
    sd = {}

    def add(key, fan_in, fan_out):
        sd[f"lora_unet_{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.1
        sd[f"lora_unet_{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.1
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(float(alpha))

    for i, blk in enumerate(tr.transformer_blocks):
        add(f"double_blocks_{i}_img_attn_qkv", D, 3 * D)
        add(f"double_blocks_{i}_img_attn_proj", D, D)
        add(f"double_blocks_{i}_txt_attn_qkv", D, 3 * D)
        add(f"double_blocks_{i}_txt_attn_proj", D, D)
        add(f"double_blocks_{i}_img_mlp_0", D, blk.ff.net[0].proj.out_features)
        add(f"double_blocks_{i}_img_mlp_2", blk.ff.net[2].in_features, D)
    for i, blk in enumerate(tr.single_transformer_blocks):
        if linear1:
            add(f"single_blocks_{i}_linear1", D, 3 * D + blk.proj_mlp.out_features)
        add(f"single_blocks_{i}_linear2", blk.proj_out.in_features, D)
    return sd


def with_alphas(sd, alpha_of):
    """diffusers keys plus ``<prefix>.<module>.alpha`` tensors (FLUX loaders read them)."""
    out = dict(sd)
    for k in sd:
        if k.endswith(".lora_A.weight"):
            out[k.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(alpha_of(k)))
    return out


def unprefixed(sd):
    return {k.split(".", 1)[1]: v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# what diffusers loads


def peft_view(model, adapter):
    """{module path: (A, B, scale)} of every PEFT LoRA linear holding ``adapter``."""
    from peft.tuners.lora.layer import Linear

    return {
        name: (m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach(), float(m.scaling[adapter]))
        for name, m in model.named_modules()
        if isinstance(m, Linear) and adapter in m.lora_A
    }


def assert_same_layers(ours, ref):
    assert ref, "diffusers loaded nothing: the test file is wrong"
    assert sorted(ours) == sorted(ref)
    for path, (A, B, s) in ours.items():
        a, b, t = ref[path]
        assert isinstance(s, float)
        assert A.shape == a.shape and B.shape == b.shape, path
        assert torch.equal(A, a) and torch.equal(B, b), path
        assert s == pytest.approx(t, rel=1e-7, abs=0), path
        torch.testing.assert_close(s * B.double() @ A.double(), t * b.double() @ a.double(), rtol=1e-12, atol=0)


def pipeline_load(pipe, path, name):
    pipe.load_lora_weights(str(path), adapter_name=name)
    return peft_view(pipe.unet if hasattr(pipe, "unet") else pipe.transformer, name)


def model_load(pipe, path, name):
    """Model-level files (no ``unet.``/``transformer.`` prefix): ``model.load_lora_adapter(prefix=None)``."""
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    model.load_lora_adapter(str(path), prefix=None, adapter_name=name)
    return peft_view(model, name)


def _sd15_diffusers(pipe):
    return with_text_encoder(pipe, lora_state_dict(pipe.unet, "unet", 4, seed=1)), {}, "peft", pipeline_load


def _sd15_unprefixed(pipe):
    return unprefixed(lora_state_dict(pipe.unet, "unet", 8, seed=2)), {}, "peft", model_load


def _sd15_attn_procs(pipe):
    return to_attn_procs(lora_state_dict(pipe.unet, "unet", 4, seed=3)), {}, "attn-procs", pipeline_load


def _sd15_kohya(pipe):
    sd = to_kohya(lora_state_dict(pipe.unet, "unet", 4, seed=4), alpha=2.0)  # scale 0.5
    # SD1.5's proj_in / proj_out are 1x1 convs: a conv LoRA that the loader skips (diffusers loads it as a
    # PEFT Conv2d, which peft_view does not list)
    g = torch.Generator().manual_seed(5)
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, nn.Conv2d) and name.endswith(("proj_in", "proj_out")):
            base = "lora_unet_" + name.replace(".", "_")
            sd[f"{base}.lora_down.weight"] = torch.randn(4, mod.in_channels, 1, 1, generator=g)
            sd[f"{base}.lora_up.weight"] = torch.randn(mod.out_channels, 4, 1, 1, generator=g)
            sd[f"{base}.alpha"] = torch.tensor(2.0)
    return with_text_encoder(pipe, sd, kohya_alpha=1.0), {}, "kohya", pipeline_load


def _sdxl_diffusers(pipe):
    return lora_state_dict(pipe.unet, "unet", 8, seed=1), {}, "peft", pipeline_load


def _sdxl_kohya(pipe):
    return sdxl_kohya(pipe.unet, 4, seed=2, alpha=1.0), {"unet_config": pipe.unet.config}, "kohya", pipeline_load


def _sdxl_kohya_dict_config(pipe):  # the CLI passes dict(unet.config)
    return sdxl_kohya(pipe.unet, 8, seed=3, alpha=16.0), {"unet_config": dict(pipe.unet.config)}, "kohya", pipeline_load


def _sd3_diffusers(pipe):
    return lora_state_dict(pipe.transformer, "transformer", 4, seed=1, targets=MMDIT_TARGETS), {}, "peft", pipeline_load


def _sd3_diffusers_family(pipe):
    sd, _, fmt, load = _sd3_diffusers(pipe)
    return sd, {"family": "sd3"}, fmt, load


def _flux_diffusers_alpha(pipe):
    sd = lora_state_dict(pipe.transformer, "transformer", 4, seed=1, targets=FLUX_TARGETS)
    return with_alphas(sd, lambda k: 8.0 if "to_q" in k else 2.0), {}, "peft", pipeline_load


def _flux_unprefixed(pipe):
    return unprefixed(lora_state_dict(pipe.transformer, "transformer", 4, seed=2, targets=FLUX_TARGETS)), {}, "peft", model_load


def _flux_kohya(pipe):
    return flux_kohya(pipe.transformer, 4, seed=3, alpha=2.0), {}, "kohya-flux", pipeline_load


FORMATS = {
    "sd15-diffusers+te": (sd15_pipeline, _sd15_diffusers),
    "sd15-peft-unprefixed": (sd15_pipeline, _sd15_unprefixed),
    "sd15-attn-procs": (sd15_pipeline, _sd15_attn_procs),
    "sd15-kohya+te+conv": (sd15_pipeline, _sd15_kohya),
    "sdxl-diffusers": (sdxl_pipeline, _sdxl_diffusers),
    "sdxl-kohya-sgm": (sdxl_pipeline, _sdxl_kohya),
    "sdxl-kohya-sgm-dict-config": (sdxl_pipeline, _sdxl_kohya_dict_config),
    "sd3-diffusers": (sd3_pipeline, _sd3_diffusers),
    "sd3-diffusers-family": (sd3_pipeline, _sd3_diffusers_family),
    "flux-diffusers+alpha": (flux_pipeline, _flux_diffusers_alpha),
    "flux-peft-unprefixed": (flux_pipeline, _flux_unprefixed),
    "flux-kohya": (flux_pipeline, _flux_kohya),
}


@pytest.mark.parametrize("case", list(FORMATS))
def test_loader_matches_what_diffusers_loads(case, tmp_path):
    build, write = FORMATS[case]
    pipe = build()
    sd, kwargs, fmt, diffusers_load = write(pipe)
    path = save(tmp_path, case, sd)
    assert detect_format(sd.keys(), str(path)) == fmt
    ours = load_lora_layers(path, **kwargs)
    ref = diffusers_load(pipe, path, "x")
    assert_same_layers(ours, ref)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    check_against_model(ours, denoiser, str(path))  # PEFT-wrapped layers: checked through base_layer
    if case == "flux-kohya":  # alpha/r = 0.5 baked into A (diffusers' converter); the fused q/k/v share A
        assert {s for _, _, s in ours.values()} == {1.0}
        q, k = ours["transformer_blocks.0.attn.to_q"], ours["transformer_blocks.0.attn.to_k"]
        assert torch.equal(q[0], k[0]) and not torch.equal(q[1], k[1])
        assert "transformer_blocks.0.attn.to_q" in ours and "single_transformer_blocks.0.proj_out" in ours
    if case == "sd15-kohya+te+conv":
        assert {s for _, _, s in ours.values()} == {0.5}
        assert not any("proj_in" in p or "proj_out" in p for p in ours)
    if case == "sdxl-kohya-sgm":
        assert {s for _, _, s in ours.values()} == {0.25}
        assert any(p.startswith("down_blocks.1.attentions.0.transformer_blocks.1.") for p in ours)
        assert any(p.startswith("mid_block.") for p in ours) and any(p.startswith("up_blocks.0.attentions.1.") for p in ours)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_per_layer_alphas_give_per_layer_scales(family, tmp_path):
    """alpha/r per layer from the file. (diffusers 0.42 itself applies the most common alpha to every
    layer of such a kohya file: its alpha_pattern keeps the kohya names, which match no PEFT module.)"""
    pipe = (sd15_pipeline if family == "sd15" else sdxl_pipeline)()
    alpha = lambda p: 1.0 if ".attn1." in p else 3.0  # noqa: E731
    if family == "sd15":
        sd = to_kohya(lora_state_dict(pipe.unet, "unet", 4, seed=1), alpha=3.0)
        for k in sd:
            if k.endswith(".alpha") and "_attn1_" in k:
                sd[k] = torch.tensor(1.0)
        kwargs = {}
    else:
        sd = sdxl_kohya(pipe.unet, 4, seed=1, alpha=alpha)
        kwargs = {"unet_config": pipe.unet.config}
    ours = load_lora_layers(save(tmp_path, "mixed", sd), **kwargs)
    assert len(ours) >= 16
    assert {s for _, _, s in ours.values()} == {0.25, 0.75}
    for path, (A, _, s) in ours.items():
        assert A.shape[0] == 4 and s == alpha(path) / 4, path
    # A and B themselves are what diffusers loads
    ref = pipeline_load(pipe, save(tmp_path, "mixed2", sd), "x")
    assert sorted(ref) == sorted(ours)
    assert all(torch.equal(ours[p][0], ref[p][0]) and torch.equal(ours[p][1], ref[p][1]) for p in ours)


def test_load_lora_pair_and_fuse_matches_peft(tmp_path):
    """The downstream flow: two files of different formats and ranks -> LoRAPair -> fuse_modules on the
    UNet's plain linears ("merge") == PEFT with both adapters active, per layer and for the whole UNet."""
    pipe = sd15_pipeline()
    unet = pipe.unet
    subject = save(tmp_path, "subject", to_kohya(lora_state_dict(unet, "unet", 4, seed=1, scale=0.3), alpha=1.0))
    style = save(tmp_path, "style", lora_state_dict(unet, "unet", 8, seed=2, scale=0.3))
    pair = load_lora_pair(subject, style)
    assert isinstance(pair, LoRAPair) and pair.subject is pair[0] and pair.style is pair[1]
    assert pair.common() == list(pair.subject) and len(pair.common()) == 32
    assert {A.shape[0] for A, _, _ in pair.subject.values()} == {4} and {s for *_, s in pair.subject.values()} == {0.25}
    assert {A.shape[0] for A, _, _ in pair.style.values()} == {8} and {s for *_, s in pair.style.values()} == {1.0}
    for layers, path in ((pair.subject, subject), (pair.style, style)):
        check_against_model(layers, unet, str(path))

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    modules = dict(unet.named_modules())
    names = pair.common()
    with torch.no_grad():
        base = unet(sample, 500, text).sample
        fused = fuse_modules([modules[n] for n in names], [pair.subject[n] for n in names],
                             [pair.style[n] for n in names], "merge", names=names)
        ours = unet(sample, 500, text).sample
        fused.remove()
        assert not any("forward" in m.__dict__ for m in unet.modules())
        pipe.load_lora_weights(str(subject), adapter_name="sbj")
        pipe.load_lora_weights(str(style), adapter_name="sty")
        pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
        ref = unet(sample, 500, text).sample
    assert (ref - base).abs().max() > 1e-3  # the LoRAs matter
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def peft_hints_unmatched_patterns() -> bool:
    """Whether the installed PEFT warns of alpha_pattern / rank_pattern keys that match no module."""
    import inspect

    from peft.tuners import tuners_utils

    return "keys did not match any targeted module" in inspect.getsource(tuners_utils)


def mixed_alpha_kohya(family, pipe, seed):
    """A kohya file of ``family`` (rank 4) whose attn1 to_q / to_k layers have alpha 1 (a quarter of the
    attention linears) and all others alpha 3 (the most common one)."""
    if family == "sd15":
        sd = to_kohya(lora_state_dict(pipe.unet, "unet", 4, seed=seed), alpha=3.0)
        return {k: torch.tensor(1.0) if k.endswith(".alpha") and ("_attn1_to_q" in k or "_attn1_to_k" in k) else v
                for k, v in sd.items()}, {}
    alpha = lambda p: 1.0 if p.endswith((".attn1.to_q", ".attn1.to_k")) else 3.0  # noqa: E731
    return sdxl_kohya(pipe.unet, 4, seed=seed, alpha=alpha), {"unet_config": pipe.unet.config}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_per_layer_alphas_peft_lost_are_warned_and_fixed(family, tmp_path):
    """Issue 13 case 7: diffusers 0.42 + PEFT give the attn1 to_q / to_k layers of a kohya file with
    per-layer alphas the most common alpha (3, scale 0.75) instead of the file's (1, scale 0.25);
    `lorafuse inspect` and load_lora_pair read 0.25. accelerate_fusion says so (adapter, count, one
    example, the fix), and fix_peft_alphas makes PEFT's scales those of the file, set_adapters weights kept."""
    from lorafuse import accelerate_fusion
    from lorafuse.commands.inspect_lora import describe_file
    from lorafuse.integrations import LoRAAlphaWarning, fix_peft_alphas
    from lorafuse.integrations.lora_files import pipeline_alpha_mismatches

    pipe = (sd15_pipeline if family == "sd15" else sdxl_pipeline)()
    sd, kwargs = mixed_alpha_kohya(family, pipe, seed=1)
    subject = save(tmp_path, "subject", sd)
    style = save(tmp_path, "style", to_kohya(lora_state_dict(pipe.unet, "unet", 8, seed=2), alpha=4.0))  # one alpha
    pair = load_lora_pair(subject, style, **kwargs)  # lorafuse's own loader: the file's per-layer scales
    inspected = describe_file(str(subject), unet_config=kwargs.get("unet_config"))["layers"]  # `lorafuse inspect`
    assert {p: s for p, (*_, s) in inspected.items()} == {p: s for p, (*_, s) in pair.subject.items()}
    attn1 = sorted(p for p in pair.subject if p.endswith((".attn1.to_q", ".attn1.to_k")))
    assert {pair.subject[p][2] for p in attn1} == {0.25} and {s for p, (*_, s) in pair.subject.items()
                                                                if p not in attn1} == {0.75}
    with warnings.catch_warnings(record=True) as hints:  # PEFT's own hint at load (PEFT >= 0.21; older: silent)
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(subject), adapter_name="sbj")
    hints = [str(w.message) for w in hints if issubclass(w.category, RuntimeWarning)]
    assert any("alpha_pattern keys did not match" in m for m in hints) == peft_hints_unmatched_patterns(), hints
    pipe.load_lora_weights(str(style), adapter_name="sty")
    loaded = peft_view(pipe.unet, "sbj")
    wrong = sorted(p for p in loaded if loaded[p][2] != pair.subject[p][2])
    assert wrong == attn1 and {loaded[p][2] for p in wrong} == {0.75}  # the bug this guards against

    found = pipeline_alpha_mismatches(pipe)
    assert list(found) == [("unet", "sbj")]
    assert sorted(e.path for e in found["unet", "sbj"]) == attn1
    assert all((e.rank, e.expected_scale, e.loaded_scale) == (4, 0.25, 0.75) for e in found["unet", "sbj"])
    with pytest.warns(LoRAAlphaWarning) as record:
        handle = accelerate_fusion(pipe, "sbj", "sty", method="merge", progress=False)
    handle.remove()
    msgs = [str(w.message) for w in record if issubclass(w.category, LoRAAlphaWarning)]
    assert len(msgs) == 1, msgs
    e = found["unet", "sbj"][0]
    assert re.search(rf"adapter 'sbj' .* on {len(attn1)} of {len(loaded)} unet layers \(e\.g\. {re.escape(e.path)}: "
                     r"the file's alpha 1 / r 4 = scale 0\.25, PEFT applies 0\.75\).*fix_peft_alphas\(pipe\)", msgs[0])

    pipe.set_adapters(["sbj", "sty"], [0.5, 1.0])
    assert fix_peft_alphas(pipe) == len(attn1)
    assert fix_peft_alphas(pipe) == 0 and pipeline_alpha_mismatches(pipe) == {}
    fixed = peft_view(pipe.unet, "sbj")
    assert all(fixed[p][2] == pytest.approx(0.5 * pair.subject[p][2], rel=1e-12) for p in pair.subject)
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])  # PEFT recomputes the scalings from the fixed alphas
    refreshed = peft_view(pipe.unet, "sbj")
    assert {p: s for p, (*_, s) in refreshed.items()} == {p: s for p, (*_, s) in pair.subject.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoRAAlphaWarning)
        accelerate_fusion(pipe, "sbj", "sty", method="merge", progress=False).remove()


def test_alpha_check_has_no_false_alarm(tmp_path):
    """Files PEFT loads right: one alpha everywhere (kohya), diffusers keys without alphas, and a FLUX
    diffusers file whose per-module alphas PEFT matched: nothing to report, nothing to fix."""
    from lorafuse.integrations import fix_peft_alphas
    from lorafuse.integrations.lora_files import pipeline_alpha_mismatches

    pipe = sd15_pipeline()
    pipe.load_lora_weights(str(save(tmp_path, "k", to_kohya(lora_state_dict(pipe.unet, "unet", 4, seed=1), 2.0))),
                           adapter_name="k")
    pipe.load_lora_weights(str(save(tmp_path, "d", lora_state_dict(pipe.unet, "unet", 8, seed=2))), adapter_name="d")
    flux = flux_pipeline()
    sd, _, _, _ = _flux_diffusers_alpha(flux)
    flux.load_lora_weights(str(save(tmp_path, "f", sd)), adapter_name="f")
    assert flux.transformer.peft_config["f"].alpha_pattern  # per-module alphas that PEFT did apply
    for p in (pipe, flux):
        assert pipeline_alpha_mismatches(p) == {} and fix_peft_alphas(p) == 0


# ------------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def good(tmp_path):
    pipe = sd15_pipeline()
    sd = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    return pipe, sd, save(tmp_path, "good", sd)


def raises_naming(path, *more):
    pattern = re.escape(str(path)) + "".join(".*" + re.escape(m) for m in more)
    return pytest.raises(ValueError, match=re.compile(pattern, re.S))


def test_missing_file_and_directory(tmp_path):
    with raises_naming(tmp_path / "nope.safetensors", "does not exist"):
        load_lora_layers(tmp_path / "nope.safetensors")
    with raises_naming(tmp_path, "directory"):
        load_lora_layers(tmp_path)


@pytest.mark.parametrize("content", ["random", "text", "empty", "pickle"])
def test_not_safetensors(content, tmp_path):
    path = tmp_path / f"{content}.safetensors"
    data = {
        "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes(),
        "text": b"# my LoRA\nrank: 4\nthis is not a tensor file\n" * 10,
        "empty": b"",
    }
    if content == "pickle":
        torch.save({"unet.a.lora_A.weight": torch.zeros(2, 2)}, str(path))
    else:
        path.write_bytes(data[content])
    with raises_naming(path, "not a readable safetensors file"):
        load_lora_layers(path)


@pytest.mark.parametrize("damage", ["truncated-data", "truncated-header", "header-length-too-large", "bad-json"])
def test_corrupt_header(damage, good, tmp_path):
    raw = good[2].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    bad = {
        "truncated-data": raw[: 8 + n + (len(raw) - 8 - n) // 2],
        "truncated-header": raw[: 8 + n // 2],
        "header-length-too-large": struct.pack("<Q", len(raw) * 2) + raw[8:],
        "bad-json": struct.pack("<Q", n) + b"}" + raw[9 : 8 + n] + raw[8 + n :],
    }[damage]
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(bad)
    with raises_naming(path, "not a readable safetensors file"):
        load_lora_layers(path)


def test_keys_of_no_known_format(tmp_path):
    path = save(tmp_path, "model", {"model.diffusion_model.out.weight": torch.zeros(4, 4), "model.x.bias": torch.zeros(4)})
    with raises_naming(path, "no known LoRA format", "model.diffusion_model.out.weight"):
        load_lora_layers(path)
    with pytest.raises(ValueError, match="no known LoRA format"):
        detect_format([], "empty")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["lora_B", "alpha"])
def test_nan_and_inf(value, where, good, tmp_path):
    _, sd, _ = good
    key = next(k for k in sd if k.endswith(".lora_B.weight"))
    sd = dict(sd)
    if where == "alpha":
        sd = to_kohya(sd, 4.0)
        key = next(k for k in sd if k.endswith(".alpha"))
        sd[key] = torch.tensor(value)
    else:
        sd[key] = sd[key].clone()
        sd[key][1, 2] = value
    path = save(tmp_path, f"bad-{where}", sd)
    with raises_naming(path, key, "NaN or inf"):
        load_lora_layers(path)


def test_shapes_that_disagree(good, tmp_path):
    _, sd, _ = good
    a_key = next(k for k in sd if k.endswith(".lora_A.weight"))
    module = a_key[len("unet."): -len(".lora_A.weight")]
    b_key = a_key.replace("lora_A", "lora_B")
    bad = dict(sd, **{b_key: torch.randn(sd[b_key].shape[0], 5)})  # A (4, in), B (out, 5)
    path = save(tmp_path, "ranks", bad)
    with raises_naming(path, module, "A (4, ", "B (", ", 5)"):
        load_lora_layers(path)
    no_b = {k: v for k, v in sd.items() if k != b_key}
    path = save(tmp_path, "no_b", no_b)
    with raises_naming(path, module, "no up (B)"):
        load_lora_layers(path)
    no_a = {k: v for k, v in sd.items() if k != a_key}
    path = save(tmp_path, "no_a", no_a)
    with raises_naming(path, module, "no down (A)"):
        load_lora_layers(path)


def test_unsupported_lora_variants(good, tmp_path):
    _, sd, _ = good
    a_key = next(k for k in sd if k.endswith(".lora_A.weight"))
    for extra, what in ((".lora_magnitude_vector", "DoRA"), (".lora_B.bias", "bias")):
        key = a_key.replace(".lora_A.weight", extra)
        path = save(tmp_path, what, dict(sd, **{key: torch.ones(sd[a_key.replace("lora_A", "lora_B")].shape[0])}))
        with raises_naming(path, key, what):
            load_lora_layers(path)


def test_no_denoiser_layers(good, tmp_path):
    pipe, _, _ = good
    te_only = {k: v for k, v in with_text_encoder(pipe, {}).items()}
    path = save(tmp_path, "te_only", te_only)
    with raises_naming(path, "no sd denoiser linear layers"):
        load_lora_layers(path)
    conv_only = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 32, 3, 3),
                 "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    path = save(tmp_path, "conv_only", conv_only)
    with raises_naming(path, "no sd denoiser linear layers"):
        load_lora_layers(path)


def test_conversions_diffusers_cannot_do(tmp_path):
    """Errors from diffusers' converters name the file: FLUX kohya ``linear1`` is split with FLUX.1's
    3072 widths (a bare assert in diffusers); SDXL SGM block names need the UNet config."""
    pipe = flux_pipeline()
    path = save(tmp_path, "flux_linear1", flux_kohya(pipe.transformer, 4, seed=1, alpha=4.0, linear1=True))
    with raises_naming(path, "diffusers could not convert it as a flux LoRA", "AssertionError"):
        load_lora_layers(path)
    xl = sdxl_pipeline()
    path = save(tmp_path, "sgm", sdxl_kohya(xl.unet, 4, seed=1, alpha=1.0))
    with raises_naming(path, "unet_config"):
        load_lora_layers(path)
    with raises_naming(path, "unet_config"):
        load_lora_layers(path, family="sd")


def test_check_against_model(good, tmp_path):
    pipe, _, path = good
    layers = load_lora_layers(path)
    check_against_model(layers, pipe.unet, str(path))
    name = next(iter(layers))
    A, B, s = layers[name]
    wrong_in = dict(layers, **{name: (torch.randn(4, A.shape[1] + 3), B, s)})
    with raises_naming(path, name, f"({B.shape[0]}, {A.shape[1] + 3})"):
        check_against_model(wrong_in, pipe.unet, str(path))
    wrong_out = dict(layers, **{name: (A, torch.randn(B.shape[0] * 2, 4), s)})
    with raises_naming(path, name, f"({B.shape[0] * 2}, {A.shape[1]})"):
        check_against_model(wrong_out, pipe.unet, str(path))
    extra = dict(layers, **{"down_blocks.9.attn.to_q": (A, B, s)})
    with raises_naming(path, "down_blocks.9.attn.to_q", "not in the model"):
        check_against_model(extra, pipe.unet, str(path))
    flux = load_lora_layers(save(tmp_path, "flux", _flux_diffusers_alpha(flux_pipeline())[0]))
    with raises_naming(path, "targets none of the model's layers"):
        check_against_model(flux, pipe.unet, str(path))
    with raises_naming(path, "no layers"):
        check_against_model({}, pipe.unet, str(path))
    # an SDXL LoRA on the SD1.5 UNet: same module names, other widths
    xl = load_lora_layers(save(tmp_path, "xl", lora_state_dict(sdxl_pipeline().unet, "unet", 4, seed=1)))
    with raises_naming(path, "has weight"):
        check_against_model(xl, pipe.unet, str(path))


def test_pair_is_all_or_nothing(good, tmp_path):
    pipe, sd, path = good
    bad = tmp_path / "second.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = None
    with raises_naming(bad, "not a readable safetensors file"):
        result = load_lora_pair(path, bad)
    assert result is None
    with raises_naming(bad):
        load_lora_pair(bad, path)  # the first file fails: named too
    # no common layer: both files named
    down = save(tmp_path, "down", {k: v for k, v in sd.items() if ".down_blocks." in k})
    up = save(tmp_path, "up", {k: v for k, v in sd.items() if ".up_blocks." in k})
    with raises_naming(down, str(up), "no common layer"):
        load_lora_pair(down, up)
    # nothing touched the model
    assert type(pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    pair = load_lora_pair(path, path, family="sd")
    assert pair.common() == list(pair.subject)


def test_import_does_not_import_diffusers_or_peft():
    import subprocess
    import sys

    code = (
        "import lorafuse, sys; assert 'diffusers' not in sys.modules and 'peft' not in sys.modules; "
        "from lorafuse.integrations import load_lora_pair, load_lora_layers, LoRAPair, fuse_module, fuse_modules, "
        "ModuleFusion; assert 'diffusers' not in sys.modules and 'peft' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
