"""Offloading with each weights mode ("scratch", "inplace": merged path; "off": fused path), on the CPU.

The CPU cannot show device moves, so the cases are those where the weights' storage really changes on
a CPU: diffusers' group offloading to disk (every onload gives new tensors, every offload leaves an
uninitialised placeholder), accelerate's sequential offload (weights on meta, the values in the hook's
``weights_map``) and model offload (hooks around the whole denoiser). Each image must equal the
method's fused path without offloading (the reference, which test_merged.py checks against PEFT replaying
the logged decisions), and after ``remove()`` the pipeline must give the plain PEFT image again."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.integrations import accelerate_fusion  # noqa: E402

from .test_diffusers import close, make  # noqa: E402
from .tiny import needs, run, sequential_offload  # noqa: E402

MODES = ["scratch", "inplace", "off"]
STEPS = 2
CPU = torch.device("cpu")
KLORA = dict(method="klora", backend="torch", pattern="s*")


def plain_unet(pipe):
    """One UNet call outside any pipeline run (no timestep reaches lorafuse: PEFT's sum of both adapters),
    cheaper than an image for checking the pipeline after remove()."""
    g = torch.Generator().manual_seed(3)
    sample, text = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, 500, text).sample


@pytest.fixture(scope="module")
def reference():
    """(plain UNet output, K-LoRA's image on the fused path without offloading)."""
    pipe = make("sd15")
    plain = plain_unet(pipe)
    h = accelerate_fusion(pipe, "sbj", "sty", weights="off", **KLORA)
    fused = run(pipe, "sd15", STEPS)
    h.remove()
    return plain, fused


def group_offload(pipe, level, tmp_path):
    kw = {"num_blocks_per_group": 1} if level == "block_level" else {}
    pipe.unet.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=level,
                                   offload_to_disk_path=str(tmp_path), **kw)


@needs("group_offload_to_disk")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level,order", [("block_level", "offload first"), ("leaf_level", "fuse first")])
def test_group_offload_to_disk_keeps_the_methods_result(level, order, mode, reference, tmp_path):
    """block level, enabled before accelerate_fusion: the method prepares from the values on disk (the
    tensors are placeholders then) and the merged weights follow the new tensors of every onload.
    leaf level: the layers' own leaves onload their weights, so they run PEFT with the method's gates."""
    plain, fused = reference
    pipe = make("sd15")
    if order == "offload first":
        group_offload(pipe, level, tmp_path)
    h = accelerate_fusion(pipe, "sbj", "sty", weights=mode, **KLORA)
    if order == "fuse first":
        group_offload(pipe, level, tmp_path)
    out = run(pipe, "sd15", STEPS)
    info = h.summary()
    h.remove()
    assert close(out, fused), (out - fused).abs().max()
    if level == "leaf_level":
        assert list(info["fallback_calls"]) == ["weights onloaded by their own hooks (leaf-level group offloading)"]
    else:
        assert info["fallback_calls"] == {} and info["path"] == ("fused" if mode == "off" else "merged")
    after = plain_unet(pipe)
    assert close(after, plain), (after - plain).abs().max()


@pytest.mark.parametrize("how", [pytest.param("group offload to disk", marks=needs("group_offload_to_disk")),
                                 "model offload", "sequential offload"])
def test_inplace_weights_are_handed_back_before_offloading_copies_them(how, reference, tmp_path):
    """weights="inplace" after a generation: the weights hold W + dW. Enabling offloading copies them
    (the disk file, accelerate's weights_map): the originals are written back first (pipeline and
    denoiser enable_* methods), or into accelerate's copy on the first fallback (accelerate.cpu_offload
    called directly), so the next image and the pipeline after remove() are right."""
    plain, fused = reference
    pipe = make("sd15")
    h = accelerate_fusion(pipe, "sbj", "sty", weights="inplace", **KLORA)
    assert close(run(pipe, "sd15", STEPS), fused)
    watched = {"enable_group_offload", "enable_model_cpu_offload", "enable_sequential_cpu_offload"}
    # the ones this diffusers has (group offloading: diffusers >= 0.33, on pipelines >= 0.36)
    watched = {n for n in watched if hasattr(type(pipe), n)}
    group = hasattr(type(pipe.unet), "enable_group_offload")
    assert watched <= set(vars(pipe)) and ("enable_group_offload" in vars(pipe.unet)) == group
    if how == "group offload to disk":
        group_offload(pipe, "block_level", tmp_path)
    elif how == "model offload":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        sequential_offload(pipe)
    out = run(pipe, "sd15", STEPS)
    h.remove()
    assert not watched & (set(vars(pipe)) | set(vars(pipe.unet)))
    assert close(out, fused), (out - fused).abs().max()
    after = plain_unet(pipe)
    assert close(after, plain), (after - plain).abs().max()
