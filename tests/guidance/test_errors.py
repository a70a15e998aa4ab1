"""Error cases: scorers returning a wrong shape or non-finite values, unusable references, bad options.
(Pipelines without a VAE: test_refine.py::test_errors_pipeline_without_vae.)"""

import pytest
import torch

from lorafuse.guidance import GuidanceConfig, GuidanceError, LatentRefiner


class Bad(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.w = torch.nn.Linear(3, 4)

    def forward(self, x):
        e = self.w(x.mean(dim=(2, 3)))
        if self.mode == "flat":
            return e.sum(dim=1)
        if self.mode == "3d":
            return e[:, :, None]
        if self.mode == "batch":
            return e[:1]
        if self.mode == "nan_images" and x.shape[-1] == 32:  # fine on references (40x40), NaN on images
            return e * float("nan")
        if self.mode == "inf":
            return e + float("inf")
        if self.mode == "tuple":
            return (e,)
        return e


def _refiner(sd15, scorer, images=None):
    images = torch.rand(2, 3, 40, 40) if images is None else images
    return LatentRefiner(sd15, GuidanceConfig(subject_scorer=scorer, subject_images=images))


def _step(ref, sd15):
    sd15.scheduler.set_timesteps(2)
    z = torch.randn(1, 4, 32, 32)
    return ref.step(z, torch.randn_like(z), sd15.scheduler.timesteps[0], 0, 2)


@pytest.mark.parametrize("mode,msg", [("flat", "shape"), ("3d", "shape"), ("batch", "shape"), ("inf", "non-finite"),
                                      ("tuple", "tensor"), ("nan_images", "non-finite")])
def test_bad_scorer_output(sd15, mode, msg):
    ref = _refiner(sd15, Bad(mode))
    with pytest.raises(GuidanceError, match=msg) as e:
        _step(ref, sd15)
    assert "subject_scorer" in str(e.value)


def test_references_any_size_are_resized(sd15, dino):
    refs = [torch.rand(3, 20, 70), torch.rand(1, 3, 32, 32), (torch.rand(3, 50, 50) * 255).to(torch.uint8)]
    ref = _refiner(sd15, dino, refs)
    assert ref.reference_embeddings("subject").shape[0] == 3
    assert torch.isfinite(_step(ref, sd15)).all()


@pytest.mark.parametrize("images,msg", [
    (torch.rand(1, 4, 32, 32), r"\(B, 3, H, W\)"),
    (torch.rand(32, 32), r"\(B, 3, H, W\)"),
    (torch.rand(1, 3, 32, 32) * 255, "0-255"),
    (torch.rand(1, 3, 32, 32) * 2 - 1, r"\[-1, 1\]"),
    ([], "empty"),
    ("ref.png", "PIL"),
])
def test_bad_references(sd15, dino, images, msg):
    ref = _refiner(sd15, dino, images)
    with pytest.raises(GuidanceError, match=msg):
        _step(ref, sd15)


def test_strict_scorer_rejects_wrong_size_references(sd15, dino):
    from lorafuse.guidance import DINOScorer

    strict = DINOScorer(dino.model, resize=False)
    with pytest.raises(GuidanceError, match="resize=False"):
        _step(_refiner(sd15, strict, torch.rand(1, 3, 40, 40)), sd15)
    assert torch.isfinite(_step(_refiner(sd15, strict, torch.rand(1, 3, 32, 32)), sd15)).all()


def test_mismatched_widths(sd15, dino):
    class Wide(torch.nn.Module):
        def forward(self, x):
            return dino(x) if x.shape[-1] == 40 else torch.cat([dino(x), dino(x)], 1)

    with pytest.raises(GuidanceError, match="width"):
        _step(_refiner(sd15, Wide()), sd15)


def test_config_validation(dino):
    imgs = torch.rand(1, 3, 8, 8)
    for kw, msg in [({}, "nothing to score"), (dict(subject_scorer=dino), "both"),
                    (dict(subject_scorer=dino, subject_images=imgs, eta=float("nan")), "eta"),
                    (dict(subject_scorer=dino, subject_images=imgs, every=0), "every"),
                    (dict(subject_scorer=dino, subject_images=imgs, start=0.8, end=0.2), "start"),
                    (dict(subject_scorer=dino, subject_images=imgs, grad_through="unet"), "grad_through"),
                    (dict(subject_scorer=dino, subject_images=imgs, normalize="l2"), "normalize"),
                    (dict(subject_scorer=dino, subject_images=imgs, m=-1), "m must"),
                    (dict(subject_scorer=dino, subject_images=imgs, steps=[-1]), "steps"),
                    (dict(subject_scorer="dino", subject_images=imgs), "callable")]:
        with pytest.raises(GuidanceError, match=msg):
            GuidanceConfig(**kw)
    with pytest.raises(TypeError, match="GuidanceConfig"):
        LatentRefiner(object(), {"eta": 1})


def test_non_finite_gradient(sd15, dino):
    ref = _refiner(sd15, dino)
    sd15.scheduler.set_timesteps(2)
    z = torch.randn(1, 4, 32, 32)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(GuidanceError, match="non-finite"):
        ref.step(z, torch.randn_like(z), sd15.scheduler.timesteps[0], 0, 2)
