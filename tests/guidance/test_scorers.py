"""Scorers: shapes, differentiability, preprocessing (resize / crop / strict size) and loading a
local folder written by save_pretrained (no downloads)."""

import json

import pytest
import torch

from lorafuse.guidance import CLIPScorer, DINOScorer, GuidanceError, load_scorer
from lorafuse.guidance.scorers import check_embeddings


@pytest.mark.parametrize("make", [lambda: CLIPScorer.tiny(), lambda: DINOScorer.tiny(),
                                  lambda: DINOScorer.tiny(arch="dinov2")], ids=["clip", "vit", "dinov2"])
def test_embedding_shape_and_gradient(make):
    s = make()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    e = s(x)
    assert e.shape[0] == 3 and e.ndim == 2 and torch.isfinite(e).all()
    (g,) = torch.autograd.grad(e.square().sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0
    assert all(not p.requires_grad for p in s.parameters())  # frozen: gradients go to the images only
    # batch invariance: a row's embedding does not depend on the other rows
    torch.testing.assert_close(s(x[1:2]), e[1:2], rtol=1e-5, atol=1e-6)


def test_resize_and_strict_size(dino):
    x = torch.rand(1, 3, 32, 32)
    big = torch.nn.functional.interpolate(x, size=(64, 64), mode="nearest")  # exact 2x upsample
    assert dino(big).shape == dino(x).shape
    # non-square: shorter side resized, centre crop; differentiable
    y = torch.rand(2, 3, 48, 80, requires_grad=True)
    (g,) = torch.autograd.grad(dino(y).sum(), y)
    assert g.shape == y.shape
    strict = DINOScorer(dino.model, resize=False)
    strict(x)  # the model's size is fine
    with pytest.raises(GuidanceError, match="resize=False"):
        strict(big)


def test_input_checks(dino):
    with pytest.raises(GuidanceError, match=r"\(B, 3, H, W\)"):
        dino(torch.rand(1, 4, 32, 32))
    with pytest.raises(GuidanceError, match="PIL"):
        dino([1, 2, 3])
    u8 = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)
    torch.testing.assert_close(dino(u8), dino(u8.float() / 255))
    assert dino(torch.rand(3, 32, 32)).shape[0] == 1


def test_check_embeddings_errors():
    check_embeddings(torch.zeros(2, 5), 2, "s")
    for bad, msg in [(torch.zeros(2), "shape"), (torch.zeros(3, 5), "shape"), (torch.zeros(2, 5, 1), "shape"),
                     (torch.tensor([[1.0, float("nan")]] * 2), "non-finite"), ([0, 1], "tensor"),
                     (torch.zeros(2, 5, dtype=torch.long), "dtype")]:
        with pytest.raises(GuidanceError, match=msg):
            check_embeddings(bad, 2, "s")


@pytest.mark.parametrize("kind", ["clip", "vit", "dinov2"])
def test_save_pretrained_and_load_from_local_folder(tmp_path, kind):
    s = {"clip": CLIPScorer.tiny, "vit": DINOScorer.tiny, "dinov2": lambda: DINOScorer.tiny(arch="dinov2")}[kind]()
    s.model.save_pretrained(tmp_path)
    cls = CLIPScorer if kind == "clip" else DINOScorer
    x = torch.rand(2, 3, 32, 32)
    for loaded in (cls.from_pretrained(tmp_path), load_scorer(tmp_path)):
        assert type(loaded) is cls
        torch.testing.assert_close(loaded(x), s(x))
    # preprocessing read from preprocessor_config.json when present
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 40},
         "crop_size": {"height": 32, "width": 32}}))
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.resize_to == 40 and loaded.image_size == 32
    torch.testing.assert_close(loaded.mean.flatten(), torch.full((3,), 0.5))


def test_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        CLIPScorer.from_pretrained("openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DINOScorer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_scorer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(GuidanceError, match="unsupported model_type"):
        load_scorer(tmp_path)
