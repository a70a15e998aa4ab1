"""EST-LoRA's style discrepancy probe: D in [0, 2], equal to the formula on the probe images, each
probe is the one-adapter generation, the cache hits, and the probe handles are removed."""

import pytest
import torch

import lorafuse
from lorafuse.guidance import (GuidanceError, clear_style_discrepancy_cache, enable_guidance, probe_images,
                               style_discrepancy, style_discrepancy_cache_info)

KW = dict(num_inference_steps=2, height=32, width=32, guidance_scale=6.0)


def _count_calls(unet):
    n = [0]
    return n, unet.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))


def test_D_equals_the_formula_and_is_cached(sd15, dino):
    clear_style_discrepancy_cache()
    n, hook = _count_calls(sd15.unet)
    probe = style_discrepancy(sd15, "a photo of sks dog", "sbj", "sty", dino, seed=0, return_probe=True, **KW)
    calls = n[0]
    assert calls == 4  # two probes x two steps, one UNet call per step (CFG batched)
    try:
        assert 0.0 <= probe.D <= 2.0 and probe.D > 0
        with torch.no_grad():
            e_c, e_s = dino(probe.subject_image), dino(probe.style_image)
        expect = 1.0 - torch.nn.functional.cosine_similarity(e_c.double(), e_s.double(), dim=-1).item()
        assert probe.D == pytest.approx(expect, abs=1e-6)
        assert probe.subject_image.shape == (1, 3, 32, 32) and 0 <= probe.subject_image.min() <= probe.subject_image.max() <= 1
        # a second call with the same key: no generation, same value
        D2 = style_discrepancy(sd15, "a photo of sks dog", "sbj", "sty", dino, seed=0, **KW)
        assert D2 == probe.D and n[0] == calls
        info = style_discrepancy_cache_info()
        assert info["hits"] == 1 and info["misses"] == 1 and info["entries"] == 1
        # another seed or prompt is another key
        style_discrepancy(sd15, "a photo of sks dog", "sbj", "sty", dino, seed=1, **KW)
        assert n[0] == 2 * calls and style_discrepancy_cache_info()["misses"] == 2
        style_discrepancy(sd15, "a photo of sks dog", "sbj", "sty", dino, seed=0, cache=False, **KW)
        assert n[0] == 3 * calls
    finally:
        hook.remove()
    # the probe handles are gone
    assert all("forward" not in m.__dict__ for m in sd15.unet.modules())
    assert "_lorafuse_fusion_handle" not in sd15.unet.__dict__


def test_probes_are_the_one_adapter_generations(sd15):
    img_c, img_s = probe_images(sd15, "a photo of sks dog", "sbj", "sty", seed=0, **KW)
    active = sd15.get_active_adapters()
    assert not torch.equal(img_c, img_s)
    for name, img in (("sbj", img_c), ("sty", img_s)):
        sd15.set_adapters([name])  # PEFT, only this adapter active
        try:
            with torch.no_grad():
                ref = sd15("a photo of sks dog", generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
                           **KW).images
        finally:
            sd15.set_adapters(active)
        torch.testing.assert_close(img, ref, atol=2e-4, rtol=0)


def test_cache_follows_the_lora_weights(sd15, dino):
    clear_style_discrepancy_cache()
    D = style_discrepancy(sd15, "a dog", "sbj", "sty", dino, **KW)
    layer = next(m for n, m in sd15.unet.named_modules() if n.endswith("attn1.to_q"))
    w = layer.lora_B["sty"].weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(3.0)
    try:
        D2 = style_discrepancy(sd15, "a dog", "sbj", "sty", dino, **KW)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert style_discrepancy_cache_info()["misses"] == 2 and D2 != D
    assert style_discrepancy(sd15, "a dog", "sbj", "sty", dino, **KW) == D  # weights restored: hit again
    assert style_discrepancy_cache_info()["hits"] == 1


def test_probe_refuses_an_installed_fusion_or_guidance(sd15, dino, config):
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="est")
    try:
        with pytest.raises(GuidanceError, match="compute D first"):
            style_discrepancy(sd15, "a dog", "sbj", "sty", dino, cache=False, **KW)
    finally:
        h.remove()
    with enable_guidance(sd15, config()):
        with pytest.raises(GuidanceError, match="guidance is installed"):
            style_discrepancy(sd15, "a dog", "sbj", "sty", dino, cache=False, **KW)
    with pytest.raises(GuidanceError, match="sets generator"):
        style_discrepancy(sd15, "a dog", "sbj", "sty", dino, cache=False, generator=None, **KW)
    with pytest.raises(GuidanceError, match="no LoRA weights"):
        style_discrepancy(sd15, "a dog", "sbj", "nope", dino, **KW)


def test_bad_scorer_in_probe(sd15):
    with pytest.raises(GuidanceError, match="shape"):
        style_discrepancy(sd15, "a dog", "sbj", "sty", lambda x: x.mean(dim=(1, 2, 3)), cache=False, **KW)


def test_D_feeds_est(sd15, dino):
    D = style_discrepancy(sd15, "a dog", "sbj", "sty", dino, **KW)
    with lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="est", D=D) as h:
        assert h.method.D == D
