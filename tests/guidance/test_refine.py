"""The refinement step: loss decreases on the latent it changes, fp64 finite-difference gradient,
x0 predictions match the schedulers', unscheduled steps are bit-identical, nothing is retained."""

import copy
import gc
import types
import weakref

import pytest
import torch

import lorafuse
from lorafuse.guidance import GuidanceConfig, GuidanceError, LatentRefiner, enable_guidance, predict_x0, scheduler_kind
from tests.integrations.tiny import run_kwargs


def _spy_steps(handle):
    """Wrap handle.refiner.step: record (loss before, loss after) on the latent each guided step changes."""
    ref = handle.refiner
    orig = ref.step
    seen = []

    def step(sample, model_output, timestep, i, n, denoise=None):
        new = orig(sample, model_output, timestep, i, n, denoise=denoise)
        if new is not sample:
            with torch.no_grad():
                seen.append((i, float(ref.latent_loss(sample, model_output, timestep).sum()),
                             float(ref.latent_loss(new, model_output, timestep).sum())))
        return new

    ref.step = step
    return seen


def _latents_per_step(pipe, steps, **kw):
    out = []

    def cb(p, i, t, kwargs):
        out.append(kwargs["latents"].clone())
        return kwargs

    with torch.no_grad():
        pipe(**run_kwargs("sd15", steps, callback_on_step_end=cb, **kw))
    return out


def test_guided_run_decreases_loss_on_each_changed_latent(sd15, config):
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl", guidance=config())
    try:
        seen = _spy_steps(h.guidance)
        with torch.no_grad():
            sd15(**run_kwargs("sd15", 3))
        assert [s[0] for s in seen] == [0, 1, 2] and h.guidance.guided == 3
        for i, before, after in seen:
            assert after < before, (i, before, after)
        assert len(h.guidance.history) == 3 and all(torch.isfinite(torch.tensor(e["loss"])).all()
                                                    for e in h.guidance.history)
    finally:
        h.remove()


def _fp64_refiner(sd15, dino, clip, refs, **kw):
    pipe = types.SimpleNamespace(vae=copy.deepcopy(sd15.vae).double(), scheduler=copy.deepcopy(sd15.scheduler))
    cfg = GuidanceConfig(subject_scorer=copy.deepcopy(dino).double(), subject_images=refs["subject"].double(),
                         style_scorer=copy.deepcopy(clip).double(), style_images=refs["style"].double(),
                         subject_weight=0.7, style_weight=1.3, **kw)
    pipe.scheduler.set_timesteps(4)
    return LatentRefiner(pipe, cfg), pipe.scheduler


def test_gradient_matches_finite_differences_fp64(sd15, dino, clip, refs):
    ref, sched = _fp64_refiner(sd15, dino, clip, refs)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = sched.timesteps[1]
    loss, grad = ref.loss_and_grad(z, eps, t)
    assert loss.shape == (2,) and grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref.latent_loss(z, eps, t).detach())

    def L(x):
        with torch.no_grad():
            return float(ref.latent_loss(x, eps, t).sum())

    h = 1e-6
    for k in range(3):  # directional derivatives
        d = torch.randn(z.shape, generator=g, dtype=torch.float64)
        fd = (L(z + h * d) - L(z - h * d)) / (2 * h)
        assert abs(fd - float((grad * d).sum())) <= 1e-6 * max(1.0, abs(fd)), k
    for idx in [(0, 0, 0, 0), (1, 3, 7, 2)]:  # single coordinates
        e = torch.zeros_like(z)
        e[idx] = 1.0
        fd = (L(z + h * e) - L(z - h * e)) / (2 * h)
        assert abs(fd - float(grad[idx])) <= 1e-6 * max(1.0, abs(fd))
    # vae_slicing only changes how the batch is processed
    ref.config.vae_slicing = False
    loss2, grad2 = ref.loss_and_grad(z, eps, t)
    torch.testing.assert_close(grad2, grad)
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize("normalize", ["rms", "none"])
def test_update_formula_and_loss_decrease(sd15, dino, clip, refs, normalize):
    ref, sched = _fp64_refiner(sd15, dino, clip, refs, normalize=normalize, eta=0.05 if normalize == "rms" else 1.0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    t = sched.timesteps[0]
    _, grad = ref.loss_and_grad(z, eps, t)
    if normalize == "none":
        ref.config.eta = 0.05 / float(grad.pow(2).mean().sqrt())  # a small step in latent units
        expect = z - ref.config.eta * grad
    else:
        expect = z - 0.05 * grad / grad.pow(2).mean().sqrt()
    new = ref.step(z, eps, t, 0, 4)
    torch.testing.assert_close(new, expect, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert float(ref.latent_loss(new, eps, t)) < float(ref.latent_loss(z, eps, t))
    assert new.grad_fn is None and not new.requires_grad


def test_x0_prediction_matches_the_schedulers():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    for pred in ("epsilon", "v_prediction"):
        ddim = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=pred, clip_sample=False)
        ddim.set_timesteps(5)
        t = ddim.timesteps[2]
        assert scheduler_kind(ddim) == "vp"
        torch.testing.assert_close(predict_x0(ddim, z, eps, t), ddim.step(eps, t, z).pred_original_sample)
        euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=pred)
        euler.set_timesteps(5)
        t = euler.timesteps[2]
        euler._init_step_index(t)
        assert scheduler_kind(euler) == "sigma"
        x0 = predict_x0(euler, z, eps, t)
        torch.testing.assert_close(x0, euler.step(eps, t, z).pred_original_sample)
    fm = FlowMatchEulerDiscreteScheduler()
    fm.set_timesteps(1)  # sigmas (1, 0): one step lands on x0
    assert scheduler_kind(fm) == "flow"
    torch.testing.assert_close(predict_x0(fm, z, eps, fm.timesteps[0]), fm.step(eps, fm.timesteps[0], z).prev_sample)


def test_schedule_selection():
    from lorafuse.guidance import CLIPScorer

    s = CLIPScorer.tiny()
    mk = lambda **kw: GuidanceConfig(style_scorer=s, style_images=torch.rand(1, 3, 8, 8), **kw)  # noqa: E731
    assert [i for i in range(10) if mk().is_guided(i, 10)] == list(range(10))
    assert [i for i in range(10) if mk(every=3).is_guided(i, 10)] == [0, 3, 6, 9]
    assert [i for i in range(10) if mk(start=0.2, end=0.6).is_guided(i, 10)] == [2, 3, 4, 5]
    assert [i for i in range(10) if mk(every=2, start=0.3).is_guided(i, 10)] == [4, 6, 8]
    assert [i for i in range(10) if mk(steps=[1, 7], every=5).is_guided(i, 10)] == [1, 7]
    assert mk(m=2.5).weights == (0.0, 2.5)  # no subject scorer: the subject term weighs 0
    assert GuidanceConfig(style_scorer=s, style_images=torch.rand(1, 3, 8, 8), subject_scorer=s,
                          subject_images=torch.rand(1, 3, 8, 8), m=2.5, subject_weight=9).weights == (1.0, 2.5)


def test_steps_outside_the_schedule_are_bit_identical(sd15, config):
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl")
    plain = _latents_per_step(sd15, 3)
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl", guidance=config(steps=[2]))
    guided = _latents_per_step(sd15, 3)
    assert h.guidance.guided == 1 and h.guidance.steps_seen == 3
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl", guidance=config(steps=[]))
    never = _latents_per_step(sd15, 3)
    h.remove()
    assert torch.equal(guided[0], plain[0]) and torch.equal(guided[1], plain[1])
    assert not torch.equal(guided[2], plain[2])
    assert all(torch.equal(a, b) for a, b in zip(never, plain))


def test_no_graph_retained_over_ten_steps(sd15, config):
    h = enable_guidance(sd15, config())
    zs, counts = [], []
    orig = h.refiner.latent_loss

    def latent_loss(sample, model_output, timestep):
        zs.append(weakref.ref(sample))
        return orig(sample, model_output, timestep)

    h.refiner.latent_loss = latent_loss

    def graph_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.grad_fn is not None)

    def cb(p, i, t, kwargs):
        lat = kwargs["latents"]
        assert lat.grad_fn is None and not lat.requires_grad
        assert all(r() is None for r in zs), f"step {i}: a latent with a graph is still alive"
        if i in (0, 4, 9):
            counts.append(graph_tensors())
        return kwargs

    try:
        with torch.no_grad():
            sd15(**run_kwargs("sd15", 10, callback_on_step_end=cb))
    finally:
        h.remove()
    assert h.guided == 10 and len(zs) == 10
    assert counts == [0, 0, 0]


def test_remove_restores_the_pipeline(sd15, config):
    sched, unet = sd15.scheduler, sd15.unet
    hooks = dict(unet._forward_pre_hooks)
    with torch.no_grad():
        before = sd15(**run_kwargs("sd15", 2)).images
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl", guidance=config())
    g = h.guidance
    assert "step" in sched.__dict__ and lorafuse.guidance.active_guidance(sd15) is g
    h2 = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl", guidance=config(eta=0.01))  # replaces h
    assert not g.active and not h.active and lorafuse.guidance.active_guidance(sd15) is h2.guidance
    h2.remove()
    h2.remove()  # idempotent
    assert "step" not in sched.__dict__ and dict(unet._forward_pre_hooks) == hooks
    assert lorafuse.guidance.active_guidance(sd15) is None
    with torch.no_grad():
        after = sd15(**run_kwargs("sd15", 2)).images
    assert torch.equal(before, after)


def test_standalone_guidance_and_swapped_scheduler(sd15, config):
    from diffusers import EulerDiscreteScheduler

    old = sd15.scheduler
    with enable_guidance(sd15, config(every=2)) as h:
        with torch.no_grad():
            sd15(**run_kwargs("sd15", 3))
        assert h.guided == 2 and h.steps_seen == 3  # steps 0 and 2, without any fusion installed
        sd15.scheduler = EulerDiscreteScheduler.from_config(old.config)
        try:
            with torch.no_grad():
                out = sd15(**run_kwargs("sd15", 2)).images
            assert h.guided == 3 and h.steps_seen == 5 and torch.isfinite(out).all()  # wrapped at the first call
            assert "step" in sd15.scheduler.__dict__
        finally:
            new = sd15.scheduler
            sd15.scheduler = old
    assert "step" not in new.__dict__ and "step" not in old.__dict__


def test_denoiser_gradient_mode(sd15, config):
    h = lorafuse.accelerate_fusion(sd15, "sbj", "sty", method="kl", guidance=config(grad_through="denoiser"))
    ref = h.guidance.refiner
    orig = ref.loss_and_grad
    checked = []

    def loss_and_grad(sample, model_output, timestep, denoise=None):
        assert denoise is not None
        with torch.enable_grad():
            z = sample[:1].detach().requires_grad_(True)
            mo = denoise(z, slice(0, 1))
            assert mo.grad_fn is not None
            torch.testing.assert_close(mo.detach(), model_output[:1])  # straight-through: the pipeline's value
        out = orig(sample, model_output, timestep, denoise)
        vae_only = orig(sample, model_output, timestep, None)
        checked.append(not torch.allclose(out[1], vae_only[1]))
        return out

    ref.loss_and_grad = loss_and_grad
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", lorafuse.FusionFallbackWarning)
            with torch.no_grad():
                sd15(**run_kwargs("sd15", 2))
        assert checked == [True, True]
        assert h.calls == 2 and h.fallbacks == {}  # the re-runs did not advance or disturb the fusion handle
    finally:
        h.remove()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_other_families(family, dino):
    from tests.integrations import tiny

    pipe = {"sdxl": tiny.sdxl_pipeline, "sd3": tiny.sd3_pipeline, "flux": tiny.flux_pipeline}[family]()
    cfg = GuidanceConfig(subject_scorer=dino, subject_images=torch.rand(1, 3, 16, 16))
    with enable_guidance(pipe, cfg) as h:
        seen = _spy_steps(h)
        with torch.no_grad():
            out = pipe(**run_kwargs(family, 2)).images
    assert h.guided == 2 and torch.isfinite(out).all()
    assert all(after < before for _, before, after in seen)


def test_errors_pipeline_without_vae(sd15, config):
    from diffusers import StableDiffusionPipeline

    novae = StableDiffusionPipeline(**sd15.components, requires_safety_checker=False)
    novae.vae = None  # (diffusers 0.32's pipeline cannot be built without one)
    with pytest.raises(GuidanceError, match="VAE"):
        enable_guidance(novae, config())
    with pytest.raises(GuidanceError, match="VAE"):
        lorafuse.accelerate_fusion(novae, "sbj", "sty", method="kl", guidance=config())
    assert all("forward" not in m.__dict__ for m in sd15.unet.modules())  # the fusion was undone
    with pytest.raises(GuidanceError, match="pipeline"):
        enable_guidance(sd15.unet, config())
