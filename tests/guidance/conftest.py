"""Shared tiny models for the guidance tests: one SD1.5 tiny pipeline with two LoRAs ("sbj", "sty")
and tiny random-init scorers, built once per session (the tests leave the pipeline as they found it)."""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    # 2 shared cores: OpenMP spinning with 2 threads under load is ~30x slower for these tiny models
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sd15():
    from tests.integrations.tiny import load_two, sd15_pipeline

    pipe = sd15_pipeline()
    load_two(pipe, "sd15")
    return pipe


@pytest.fixture(scope="session")
def dino():
    from lorafuse.guidance import DINOScorer

    return DINOScorer.tiny(seed=1)


@pytest.fixture(scope="session")
def clip():
    from lorafuse.guidance import CLIPScorer

    return CLIPScorer.tiny(seed=2)


@pytest.fixture(scope="session")
def refs():
    g = torch.Generator().manual_seed(3)
    return {"subject": torch.rand(2, 3, 40, 40, generator=g), "style": torch.rand(1, 3, 64, 48, generator=g)}


@pytest.fixture()
def config(dino, clip, refs):
    from lorafuse.guidance import GuidanceConfig

    def make(**kw):
        base = dict(subject_scorer=dino, subject_images=refs["subject"], style_scorer=clip, style_images=refs["style"])
        base.update(kw)
        return GuidanceConfig(**base)

    return make
