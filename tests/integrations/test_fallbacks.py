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
from .tiny import lora_state_dict, needs, run, sd15_pipeline, sequential_offload  # noqa: E402


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
    pytest.importorskip("accelerate")
    pipe = mixed_pair()
    pipe.set_adapters(["sbj", "sty"])
    peft_sum = run(pipe, "sd15", 1)
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    fused = run(pipe, "sd15", 1)
    fused_log = h.gate_log
    h.remove()
    # sequential offload (weights on meta): every call falls back, the decisions stay the fused path's
    sequential_offload(pipe)
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


@needs("layerwise_casting")
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


def conv_pair():
    """SD1.5 whose "sbj" (rank 4) and "sty" (rank 8) also carry LoRAs on the 1x1 proj_in / proj_out
    convs (PEFT Conv2d layers the kernels do not patch), and whose to_out.0 only "sbj" targets."""
    from torch import nn

    pipe = sd15_pipeline()
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2, targets=("to_q", "to_k", "to_v"), scale=0.08)
    g = torch.Generator().manual_seed(4)
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, nn.Conv2d) and name.endswith(("proj_in", "proj_out")):
            for sd, r, s in ((sbj, 4, 0.1), (sty, 8, 0.08)):
                sd[f"unet.{name}.lora_A.weight"] = torch.randn(r, mod.in_channels, 1, 1, generator=g) * s
                sd[f"unet.{name}.lora_B.weight"] = torch.randn(mod.out_channels, r, 1, 1, generator=g) * s
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    return pipe


def klora_conv_replay(pipe, method, log, steps):
    """The patched layers replayed from the log, and every conv LoRA layer with the K-LoRA rule
    written out densely in fp64 (S_i = top-(r_c r_s) sum of |dW_i|, subject iff S_c / gamma >
    S_s S(tau), tau of the call as logged): PEFT with the selected adapter only."""
    from peft.tuners.lora.layer import Conv2d

    from lorafuse.integrations.replay import peft_forward_with_gates

    taus = {e["call"]: e["tau"] for e in log}
    first = min(taus)
    convs, picks = [], []
    for _, m in pipe.unet.named_modules():
        if isinstance(m, Conv2d):
            dW = [m.scaling[a] * m.lora_B[a].weight.double().flatten(1) @ m.lora_A[a].weight.double().flatten(1)
                  for a in ("sbj", "sty")]
            k = m.lora_A["sbj"].weight.shape[0] * m.lora_A["sty"].weight.shape[0]
            S_c, S_s = (d.abs().flatten().topk(k).values.sum().item() for d in dW)
            call = {"n": -1}
            convs.append((m, call))

            def forward(x, m=m, call=call, S_c=S_c, S_s=S_s):
                tau = taus[first + call["n"]]
                subject = S_c / method.gamma > S_s * method.scale(tau)
                picks.append(subject)
                return peft_forward_with_gates(m, x, (1.0, 0.0) if subject else (0.0, 1.0), ("sbj", "sty"))

            m.forward = forward
    def count(*_):
        for _, c in convs:
            c["n"] += 1

    hook = pipe.unet.register_forward_pre_hook(count)
    try:
        return replay(pipe, log, steps), picks
    finally:
        hook.remove()
        for m, _ in convs:
            del m.__dict__["forward"]


def test_coverage_policy_for_conv_and_single_adapter_layers(caplog):
    from peft.tuners.lora.layer import Conv2d

    pipe = conv_pair()
    n_conv = sum(isinstance(m, Conv2d) for m in pipe.unet.modules())
    n_out = sum(1 for n, m in pipe.unet.named_modules() if n.endswith("to_out.0") and hasattr(m, "lora_A"))
    assert n_conv > 0 and n_out > 0
    conv, single = "not a linear LoRA (conv)", "only the subject adapter targets it"
    # merge: the merge weights on every layer, as set_adapters gives ("peft" would leave 1, 1 there)
    pipe.set_adapters(["sbj", "sty"], [0.8, 0.6])
    ref = run(pipe, "sd15", 1)
    pipe.set_adapters(["sbj", "sty"])
    with caplog.at_level("INFO", logger="lorafuse"):
        h = accelerate_fusion(pipe, "sbj", "sty", "merge", backend="torch", subject_weight=0.8, style_weight=0.6)
    info = h.summary()
    assert info["coverage"] == "method" and info["peft_sum"] == {}
    assert info["method_gates"] == info["unpatched"] == {conv: n_conv, single: n_out}
    assert any(f"{n_conv} (not a linear LoRA (conv): the method's rule)" in r.message for r in caplog.records)
    out = run(pipe, "sd15", 1)
    h.remove()
    assert close(out, ref)
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())

    # klora: conv layers select by their own scores with the installed gamma; "peft" leaves the sum
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", coverage="peft")
    info = h.summary()
    assert info["method_gates"] == {} and info["peft_sum"] == {conv: n_conv, single: n_out}
    as_peft = run(pipe, "sd15", 2)
    log = h.gate_log
    h.remove()
    assert close(as_peft, replay(pipe, log, 2))
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    assert h.summary()["method_gates"] == {conv: n_conv, single: n_out}  # single: the present adapter acts
    out = run(pipe, "sd15", 2)
    log = h.gate_log
    h.remove()
    ref, picks = klora_conv_replay(pipe, h.method, log, 2)
    assert len(picks) == 2 * n_conv and set(picks) == {True, False}
    assert close(out, ref) and not close(out, as_peft)
    with pytest.raises(ValueError, match="coverage must be one of"):
        accelerate_fusion(pipe, "sbj", "sty", "klora", coverage="all")


def test_coverage_kl_conv_layers_decide_per_sample():
    """kl on the conv LoRA layers: per sample, KL(softmax(f0) || softmax(f0 + d_i)) over the output
    channels of every pixel, averaged over the sample's pixels (written out densely in fp64 here),
    selects the adapter whose PEFT output the sample gets."""
    import torch.nn.functional as F
    from peft.tuners.lora.layer import Conv2d

    from lorafuse.integrations.replay import peft_forward_with_gates

    pipe = conv_pair()
    pipe.set_adapters(["sbj", "sty"])
    h = accelerate_fusion(pipe, "sbj", "sty", "kl", backend="torch")
    out = run(pipe, "sd15", 1)
    log = h.gate_log
    h.remove()
    names, picks, convs = ("sbj", "sty"), [], [m for m in pipe.unet.modules() if isinstance(m, Conv2d)]

    def dense(m, x):
        f0 = m.base_layer(x).double()
        logp0 = F.log_softmax(f0, dim=1)
        k = [(logp0.exp() * (logp0 - F.log_softmax(f0 + m.scaling[a] * m.lora_B[a](m.lora_A[a](x)).double(), dim=1)))
             .sum(1).flatten(1).mean(1) for a in names]
        subject = (k[0] >= k[1]).tolist()
        picks.extend(subject)
        return torch.cat([peft_forward_with_gates(m, x[i: i + 1], (1.0, 0.0) if sub else (0.0, 1.0), names)
                          for i, sub in enumerate(subject)])

    for m in convs:
        m.forward = lambda x, m=m: dense(m, x)
    try:
        ref = replay(pipe, log, 1)
    finally:
        for m in convs:
            del m.__dict__["forward"]
    assert len(picks) == 2 * len(convs) and set(picks) == {True, False}
    assert close(out, ref)


@pytest.mark.parametrize("method", ["klora", "kl"])
def test_fallbacks_inside_a_compiled_denoiser_keep_the_method(method):
    """torch.compile (aot_eager) around a denoiser whose style adapter is DoRA: the fallback runs
    eagerly inside the graph (a graph break), so the image equals the uncompiled fallback run's,
    not PEFT's sum."""
    pipe = mixed_pair(dora=True)
    pipe.set_adapters(["sbj", "sty"])
    peft_sum = run(pipe, "sd15", 1)
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    eager, _ = quiet_run(pipe, 1)
    h.remove()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")
    out, msgs = quiet_run(pipe, 1)
    h.remove()
    assert msgs and "DoRA" in msgs[0] and sum(h.fallbacks.values()) > 0
    assert close(out, eager), (out - eager).abs().max()
    assert not close(out, peft_sum)


def test_coverage_none_runs_the_unpatched_layers_without_lora():
    """coverage="none" (the official K-LoRA code's result): the conv and single-adapter LoRA layers
    compute their base layer; the image equals a replay of the logged decisions in which those
    layers have no adapter active."""
    from peft.tuners.lora.layer import Conv2d

    pipe = conv_pair()
    conv, single = "not a linear LoRA (conv)", "only the subject adapter targets it"
    n_conv = sum(isinstance(m, Conv2d) for m in pipe.unet.modules())
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch", coverage="none")
    info = h.summary()
    assert info["coverage"] == "none" and info["method_gates"] == info["peft_sum"] == {}
    assert info["no_lora"][conv] == n_conv and info["no_lora"][single] > 0
    out = run(pipe, "sd15", 2)
    log = h.gate_log
    uncovered = [pipe.unet.get_submodule(p.split(".", 1)[1]) for p in info["unpatched_layers"]]
    m = next(m for m in uncovered if isinstance(m, Conv2d))
    x = torch.randn(2, m.base_layer.in_channels, 4, 4)
    with torch.no_grad():
        assert torch.equal(m(x), m.base_layer(x))
    h.remove()
    for m in uncovered:  # the replay's reference: those layers with no adapter active
        m.set_adapter([])
    assert close(out, replay(pipe, log, 2))
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())


@needs("hotswap")
def test_hotswap_rescores_the_covered_conv_layers():
    """A hotswap of the style adapter (conv LoRAs included) gives the covered conv layers the scores
    a fresh installation on the new factors computes (the patched layers are re-prepared too)."""
    from torch import nn

    def new_style():
        unet = sd15_pipeline().unet  # keys of the plain model (no LoRA loaded)
        sd = lora_state_dict(unet, "unet", 8, seed=7, targets=("to_q", "to_k", "to_v"), scale=0.3)
        g = torch.Generator().manual_seed(8)
        for name, mod in unet.named_modules():
            if isinstance(mod, nn.Conv2d) and name.endswith(("proj_in", "proj_out")):
                sd[f"unet.{name}.lora_A.weight"] = torch.randn(8, mod.in_channels, 1, 1, generator=g) * 0.3
                sd[f"unet.{name}.lora_B.weight"] = torch.randn(mod.out_channels, 8, 1, 1, generator=g) * 0.3
        return sd

    pipe = conv_pair()
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    before = {p: sc for p, (_, sc) in h._cover_scores.items()}
    assert before
    pipe.load_lora_weights(new_style(), adapter_name="sty", hotswap=True)
    after = {p: sc for p, (_, sc) in h._cover_scores.items()}
    out = run(pipe, "sd15", 2)
    h.remove()
    h = accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch")
    fresh = {p: sc for p, (_, sc) in h._cover_scores.items()}
    ref = run(pipe, "sd15", 2)
    h.remove()
    assert after == fresh and after != before
    assert close(out, ref)
