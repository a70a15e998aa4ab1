"""Fallbacks keep the method's result (issue 13): a layer call that cannot take the fused / merged
path computes what the method computes, only another way.

- kl under DoRA / sequential offload: the decision from PEFT's own pieces (decide_from_outputs),
  the selected adapter's PEFT output, logged; equal to the fused run's decisions and to a PEFT
  replay of the log, and not PEFT's sum of both adapters.
- enable_layerwise_casting: the fused path on the cast weight (layers under diffusers' hooks are
  patched through the hook chain), equal to a PEFT replay of the log under the same casting.
- coverage of LoRA layers the kernels do not patch (SD1.5 1x1 proj_in/proj_out convs, layers only
  one adapter targets): "method" drives them with the method's rule, "peft" leaves PEFT's sum;
  summary() and the INFO line count them per policy and reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.integrations import FusionFallbackWarning, accelerate_fusion  # noqa: E402

from .reference import GateReplay  # noqa: E402
from .tiny import lora_state_dict, run, sd15_pipeline  # noqa: E402


def close(a, b, atol=2e-5):
    return (a - b).abs().max().item() <= atol + 1e-4 * b.abs().max().item()


def replay(pipe, log, steps, names=("sbj", "sty")):
    rep = GateReplay(pipe, log, names)
    try:
        out = run(pipe, "sd15", steps)
        assert rep.misses == 0
        return out
    finally:
        rep.remove()


def quiet_run(pipe, steps=2):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = run(pipe, "sd15", steps)
    return out, [str(x.message) for x in w if issubclass(x.category, FusionFallbackWarning)]


def mixed_pair(dora=False):
    """SD1.5 with "sbj" (rank 4) and "sty" (rank 8, DoRA if asked) of similar strength: kl picks
    each adapter in some layers and, within one call, different adapters for the two CFG samples."""
    pipe = sd15_pipeline()
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2, scale=0.08)
    if dora:  # magnitudes within 5% of the row norms of W + dW: a perturbation of the LoRA's size
        g = torch.Generator().manual_seed(3)
        for k in list(sty):
            if k.endswith("lora_B.weight"):
                path = k[len("unet."):-len(".lora_B.weight")]
                W = pipe.unet.get_submodule(path).weight + sty[k] @ sty[k.replace("lora_B", "lora_A")]
                sty[k.replace("lora_B.weight", "lora_magnitude_vector")] = W.norm(dim=1) * (
                    1 + 0.05 * torch.randn(W.shape[0], generator=g))
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    return pipe


def test_kl_fallback_keeps_the_decision_offload_and_dora():
    accelerate = pytest.importorskip("accelerate")
    pipe = mixed_pair()
    pipe.set_adapters(["sbj", "sty"])
    peft_sum = run(pipe, "sd15", 1)
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    fused = run(pipe, "sd15", 1)
    fused_log = h.gate_log
    h.remove()
    # sequential offload (weights on meta): every call falls back, the decisions stay the fused path's
    accelerate.cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    out, msgs = quiet_run(pipe, 1)
    log = h.gate_log
    h.remove()
    assert len(msgs) == 1 and "offload" in msgs[0] and "same result" in msgs[0] and "sum" not in msgs[0]
    assert sum(h.fallbacks.values()) == len(log) == len(fused_log) == h.num_layers
    assert [e["subject"] for e in log] == [e["subject"] for e in fused_log]
    assert all(isinstance(e["subject"], list) and len(e["subject"]) == 2 for e in log)  # per sample (CFG)
    assert {tuple(e["subject"]) for e in log} == {(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)}
    assert close(out, fused) and not close(out, peft_sum)

    # DoRA style adapter: per sample, the selected adapter's own PEFT forward (exact), as the log says
    pipe = mixed_pair(dora=True)
    pipe.set_adapters(["sbj", "sty"])
    peft_sum = run(pipe, "sd15", 1)
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    out, msgs = quiet_run(pipe, 1)
    log = h.gate_log
    h.remove()
    assert len(msgs) == 1 and "DoRA" in msgs[0] and len(log) == h.num_layers
    assert len({tuple(e["subject"]) for e in log}) > 1
    assert close(out, replay(pipe, log, 1)) and not close(out, peft_sum)


def test_layerwise_casting_keeps_the_method_before_and_after_install(caplog):
    """enable_layerwise_casting (fp8 storage) after accelerate_fusion, and before it (the PEFT layers
    then carry diffusers' hooks: ours goes innermost in the chain): the fused path on the cast
    weight, no warning, equal to a PEFT replay of the log under the same casting; remove() takes our
    forwards out of the hook chains."""
    pipe = mixed_pair()
    peft_layers_ = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and "sbj" in m.lora_A]
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert peft_layers_[0].base_layer.weight.dtype == torch.float8_e4m3fn
    pipe.set_adapters(["sbj", "sty"])
    after, msgs = quiet_run(pipe, 1)
    assert msgs == [] and sum(h.fallbacks.values()) == h.num_layers
    h.remove()
    for m in peft_layers_:  # nothing of ours left in the chain: the class forward again
        ref = m._diffusers_hook._fn_refs[0]
        assert ref.original_forward.__func__ is type(m).forward
    peft_sum = run(pipe, "sd15", 1)
    with caplog.at_level("INFO", logger="lorafuse"):
        h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
        before, msgs = quiet_run(pipe, 1)
    log = h.gate_log
    assert msgs == [] and h.summary()["unpatched"] == {} and h.summary()["layers"] == len(peft_layers_)
    assert set(h.fallbacks) == {"layerwise casting (fused path on the weight cast to the compute dtype)"}
    assert len(log) == h.num_layers and {e["subject"] for e in log} == {0.0, 1.0}
    assert any("layerwise casting" in r.message for r in caplog.records)
    h.remove()
    assert torch.equal(before, after)
    assert close(before, replay(pipe, log, 1)) and not close(before, peft_sum)
