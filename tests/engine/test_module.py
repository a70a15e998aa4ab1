"""fuse_module / fuse_modules on plain ``nn.Linear`` (no diffusers, no PEFT): every method against
the fp64 references of tests/fusion/reference.py (outputs and decisions over several step(tau)
calls), exact restoration by remove(), and all-or-nothing validation."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import lorafuse
from lorafuse.fusion import METHODS
from lorafuse.fusion.schedule import official_tau
from lorafuse.integrations import ModuleFusion, fuse_module, fuse_modules

from ..fusion.reference import decide64, formula64, gamma64, kl_rows64, rand_layers, rand_lora, scores64

K, N = 72, 40  # odd sizes: in 72, out 40; 77 rows; ranks 4 and 13
R_SUBJECT, R_STYLE = 4, 13
TAUS = [0.0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]
# method -> (options, pattern, beta) of the static-selection reference; defaults of lorafuse.fusion
STATIC = {"klora": ({}, "s*", 1.275), "est": ({}, "s", 0.5)}


def linear(bias=True, seed=0, in_features=K, out_features=N):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def loras(seed=1, K=K, N=N, scales=(0.8, 1.1)):
    torch.manual_seed(seed)
    return rand_lora(R_SUBJECT, K, N, scales[0], device="cpu"), rand_lora(R_STYLE, K, N, scales[1], device="cpu")


def inputs(shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(y, ref):
    y, ref = y.detach().double(), ref.detach()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def kl_gates64(x, W, b, subject, style, direction="forward", reduction="sample", tie="subject"):
    """(G, 2) gates of the KL method from fp64 per-row divergences; G = x.shape[0]."""
    G = x.shape[0]
    d = []
    for lora in (subject, style):
        fwd, rev = kl_rows64(x, W, b, lora)
        k = (fwd if direction == "forward" else rev).reshape(G, -1)
        d.append(k.mean(1) if reduction == "sample" else k.mean().expand(G))
    subj = d[0] >= d[1] if tie == "subject" else d[0] > d[1]
    return torch.stack((subj, ~subj), 1).double(), torch.stack(d, 1)


def reference_gates(method, x, lin, subject, style, tau):
    if method == "merge":
        return torch.tensor([1.0, 1.0], dtype=torch.float64)
    if method == "subject":
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    if method == "style":
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    if method == "kl":
        return kl_gates64(x, lin.weight, lin.bias, subject, style)[0]
    from lorafuse.fusion import LayerLoRAs

    _, pattern, beta = STATIC[method]
    sc = scores64([LayerLoRAs("l", subject, style)], method)
    subj = decide64(sc, gamma64(sc, "official"), tau, pattern, 1.5, beta)[0]
    return torch.tensor([1.0, 0.0] if subj else [0.0, 1.0], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(77, K), (3, 77, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuse_module_matches_reference(method, bias, shape):
    lin = linear(bias)
    subject, style = loras()
    x = inputs(shape)
    with torch.no_grad():
        base = lin(x)
        fused = fuse_module(lin, subject, style, method=method)
        assert isinstance(fused, ModuleFusion)
        seen = set()
        for tau in TAUS:
            fused.step(tau)
            y = lin(x)
            assert y.shape == base.shape and y.dtype == torch.float32
            g_ref = reference_gates(method, x, lin, subject, style, tau)
            g = fused.decision().gates
            if method == "kl":
                assert g.shape == (x.shape[0], 2)  # 2-D input: every row is a sample
            else:
                assert g.shape == (1, 2)
            assert torch.equal(g.double().cpu().reshape(g_ref.shape), g_ref), (method, tau)
            close(y, formula64(x, lin.weight, lin.bias, [subject, style], g_ref))
            seen.add(tuple(g_ref.reshape(-1, 2)[0].tolist()))
        fused.remove()
        assert torch.equal(lin(x), base)
    if method in STATIC:  # the single layer flips within TAUS: both LoRAs are exercised
        assert seen == {(1.0, 0.0), (0.0, 1.0)}, seen


@pytest.mark.parametrize("method", ["merge", "kl"])
def test_merge_weights_and_kl_options(method):
    lin = linear()
    subject, style = loras()
    x = inputs((4, 77, K))
    if method == "merge":
        fused = fuse_module(lin, subject, style, method="merge", subject_weight=0.6, style_weight=-0.3)
        with torch.no_grad():
            close(lin(x), formula64(x, lin.weight, lin.bias, [subject, style], torch.tensor([0.6, -0.3])))
        torch.testing.assert_close(fused.decision().gates, torch.tensor([[0.6, -0.3]]))
        fused.remove()
        return
    for opts in ({"direction": "reverse"}, {"reduction": "batch"}, {"mode": "two_pass"}, {"tie": "style"}):
        fused = fuse_module(lin, subject, style, method="kl", **opts)
        g_ref, _ = kl_gates64(x, lin.weight, lin.bias, subject, style, **{k: v for k, v in opts.items() if k != "mode"})
        with torch.no_grad():
            y = lin(x)
        assert torch.equal(fused.decision().gates.double(), g_ref), opts
        close(y, formula64(x, lin.weight, lin.bias, [subject, style], g_ref))
        fused.remove()


def test_kl_decides_per_sample_and_fixes_up_a_flip():
    """Subject acts on the first half of the input features, style on the second: a sample living in
    the first half picks the subject, one in the second half the style. Swapping the samples on the
    next call flips both decisions (the speculative path's fix-up)."""
    lin = linear(seed=3)
    subject, style = loras(seed=4, scales=(2.0, 2.0))
    subject = (subject[0].clone(), subject[1], subject[2])
    style = (style[0].clone(), style[1], style[2])
    subject[0][:, K // 2:] = 0
    style[0][:, : K // 2] = 0
    x = inputs((2, 77, K)) * 0.05
    x[0, :, : K // 2] *= 60
    x[1, :, K // 2:] *= 60
    fused = fuse_module(lin, subject, style, method="kl")
    with torch.no_grad():
        for call, xx in enumerate((x, x.flip(0), x)):
            fused.step(0.5)
            y = lin(xx)
            g_ref, d = kl_gates64(xx, lin.weight, lin.bias, subject, style)
            assert ((d[:, 0] - d[:, 1]).abs() > 0.1 * d.abs().max()).all()  # clear margins
            expected = [[1.0, 0.0], [0.0, 1.0]] if call != 1 else [[0.0, 1.0], [1.0, 0.0]]
            assert g_ref.tolist() == expected
            assert fused.decision().gates.tolist() == expected
            torch.testing.assert_close(fused.decision().stats["kl"].double(), d, rtol=1e-3, atol=1e-6)
            close(y, formula64(xx, lin.weight, lin.bias, [subject, style], g_ref))
    fused.remove()


@pytest.mark.parametrize("method,options,pattern,beta,balance", [
    ("klora", {}, "s*", 1.275, "official"),
    ("klora", {"pattern": "s", "balance": "paper"}, "s", 0.5, "paper"),
    ("est", {}, "s", 0.5, "official"),
    ("est", {"balance": "energy", "D": 0.3, "pattern": "s*"}, "s*", 0.3, "energy"),
])
def test_fuse_modules_decision_table(method, options, pattern, beta, balance):
    """Several layers share one method (gamma is global): decisions per (step, layer) == fp64 table,
    outputs == the fp64 formula with the reference gates."""
    layers = rand_layers(6, seed=3)
    mods = [linear(bias=i % 2 == 0, seed=10 + i, in_features=l.subject[0].shape[1], out_features=l.subject[1].shape[0])
            for i, l in enumerate(layers)]
    sc = scores64(layers, method)
    gamma = gamma64(sc, balance)
    fused = fuse_modules(mods, [l.subject for l in layers], [l.style for l in layers], method,
                         names=[l.name for l in layers], **options)
    assert fused.method.gamma == pytest.approx(gamma, rel=1e-9)
    xs = [inputs((2, 5, m.in_features), seed=20 + i) for i, m in enumerate(mods)]
    table, ref = [], []
    taus = [k / 20 for k in range(20)]
    with torch.no_grad():
        for tau in taus:
            fused.step(tau)
            expect = decide64(sc, gamma, tau, pattern, 1.5, beta)
            row = []
            for i, (m, x, layer) in enumerate(zip(mods, xs, layers)):
                y = m(x)
                g = torch.tensor([1.0, 0.0] if expect[i] else [0.0, 1.0], dtype=torch.float64)
                close(y, formula64(x, m.weight, m.bias, [layer.subject, layer.style], g))
                row.append(bool(fused.decision(i).gates[0, 0]))
            table.append(row)
            ref.append(expect)
    assert table == ref
    flat = [v for r in ref for v in r]
    assert any(flat) and not all(flat)  # both LoRAs win somewhere
    assert any(len({r[i] for r in ref}) == 2 for i in range(len(layers)))  # some layer flips over time
    fused.remove()


@pytest.mark.parametrize("method", ["klora", "est"])
def test_official_tau_mode_counts_from_the_first_step(method):
    """tau_mode="official": the first step() is denoiser call 0, the l-th module call of call k has the
    counter tau ((k L + l) mod L N) / (L N) (as in the official code and lorafuse.fusion)."""
    layers = rand_layers(5, seed=5)
    mods = [linear(seed=i, in_features=l.subject[0].shape[1], out_features=l.subject[1].shape[0]) for i, l in enumerate(layers)]
    L, steps = len(layers), 12
    _, pattern, beta = STATIC[method]
    sc = scores64(layers, method)
    gamma = gamma64(sc, "official")
    fused = fuse_modules(mods, [l.subject for l in layers], [l.style for l in layers], method, tau_mode="official")
    got, ref = [], []
    with torch.no_grad():
        for k in range(steps):
            fused.step(0.123, num_steps=steps)  # tau is ignored in official mode
            for i, m in enumerate(mods):
                m(inputs((1, 3, m.in_features), seed=i))
                got.append(bool(fused.decision(i).gates[0, 0]))
                tau = official_tau(k, i + 1, L, steps)
                assert fused.decision(i).tau == tau
                ref.append(decide64(sc, gamma, tau, pattern, 1.5, beta)[i])
    assert got == ref and len(set(ref)) == 2
    fused.remove()


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("method", ["merge", "klora", "kl"])
def test_triton_backend(method):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lin = linear().to(device)
    subject, style = (tuple(t.to(device) if torch.is_tensor(t) else t for t in lora) for lora in loras())
    x = inputs((2, 9, K)).to(device)
    fused = fuse_module(lin, subject, style, method=method, backend="triton")
    with torch.no_grad():
        for tau in (0.0, 0.6):
            fused.step(tau)
            y = lin(x)
            g_ref = reference_gates(method, x, lin, subject, style, tau)
            assert torch.equal(fused.decision().gates.double().cpu().reshape(g_ref.shape), g_ref)
            close(y.cpu(), formula64(x, lin.weight, lin.bias, [subject, style], g_ref))
    fused.remove()


# ------------------------------------------------------------------------------------------------
# remove()


def _snapshot(lin):
    return {
        "dict": dict(lin.__dict__),
        "state": {k: v.clone() for k, v in lin.state_dict().items()},
        "params": [(n, p.data_ptr()) for n, p in lin.named_parameters()],
        "hooks": [len(getattr(lin, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                  "_state_dict_hooks", "_load_state_dict_pre_hooks")],
    }


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_remove_restores_the_module_exactly(method, bias):
    lin = linear(bias)
    subject, style = loras()
    x = inputs((2, 77, K))
    with torch.no_grad():
        base = lin(x)
        before = _snapshot(lin)
        fused = fuse_module(lin, subject, style, method=method)
        assert "forward" in lin.__dict__
        fused.step(0.3)
        y = lin(x)
        assert not torch.equal(y, base)  # a LoRA acts
        assert all(torch.equal(v, before["state"][k]) for k, v in lin.state_dict().items())  # weights untouched
        fused.remove()
        after = _snapshot(lin)
        assert "forward" not in lin.__dict__
        assert lin.forward.__func__ is nn.Linear.forward
        assert after["dict"].keys() == before["dict"].keys()
        assert all(after["dict"][k] is v for k, v in before["dict"].items() if k not in ("_parameters", "_buffers", "_modules"))
        assert after["params"] == before["params"] and after["hooks"] == before["hooks"]
        assert after["state"].keys() == before["state"].keys()
        assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
        assert torch.equal(lin(x), base)  # bit-identical
        fused.remove()  # idempotent
        assert torch.equal(lin(x), base)
        again = fuse_module(lin, subject, style, method=method)  # can be fused again
        again.step(0.3)
        assert torch.equal(lin(x), y)
        again.remove()
        assert torch.equal(lin(x), base)


def test_remove_leaves_a_later_forward_alone():
    lin = linear()
    fused = fuse_module(lin, *loras())
    other = lambda x: x  # noqa: E731  (someone wrapped the module after lorafuse)
    lin.forward = other
    fused.remove()
    assert lin.forward is other


# ------------------------------------------------------------------------------------------------
# errors, all or nothing


def test_errors():
    lin = linear()
    subject, style = loras()
    with pytest.raises(TypeError, match="module 0 must be an nn.Linear, got Conv2d"):
        fuse_module(nn.Conv2d(K, N, 1), subject, style)
    with pytest.raises(TypeError, match="nn.Linear, got function"):
        fuse_module(lambda x: x, subject, style)
    A, B, s = subject
    bad_shapes = {
        "in": ((torch.randn(4, K - 1), B, s), style),
        "out": (subject, (style[0], torch.randn(N + 1, R_STYLE), 1.0)),
        "transposed A": ((A.t().contiguous(), B, s), style),
        "3-D A": ((A[None], B, s), style),
    }
    for what, (c, st) in bad_shapes.items():
        with pytest.raises(ValueError, match=rf"module0 (subject|style) LoRA is .* but the linear is \({N} x {K}\)"):
            fuse_module(lin, c, st)
    with pytest.raises(ValueError, match=r"need A \(r, K\) and B \(N, r\)"):
        fuse_module(lin, (A, torch.randn(N, 5), s), style)  # ranks of A and B disagree
    with pytest.raises(ValueError, match="non-finite"):
        fuse_module(lin, (A, B.clone().fill_(float("nan")), s), style)
    with pytest.raises(TypeError, match=r"\(A, B, scale\) triple"):
        fuse_module(lin, (A, B), style)
    with pytest.raises(TypeError, match=r"\(A, B, scale\) triple"):
        fuse_module(lin, (A.tolist(), B, s), style)
    with pytest.raises(ValueError, match="unknown fusion method 'ziplora'.*klora.*est.*kl.*merge"):
        fuse_module(lin, subject, style, method="ziplora")
    with pytest.raises(ValueError, match="unknown option"):
        fuse_module(lin, subject, style, method="klora", gamma=2.0)
    mods = [linear(seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="2 modules, 1 subjects, 2 styles"):
        fuse_modules(mods, [subject], [style, style])
    with pytest.raises(ValueError, match="2 modules, 2 subjects, 3 styles"):
        fuse_modules(mods, [subject] * 2, [style] * 3)
    with pytest.raises(ValueError, match="at least one module"):
        fuse_modules([], [], [])
    with pytest.raises(ValueError, match="1 names for 2 modules"):
        fuse_modules(mods, [subject] * 2, [style] * 2, names=["a"])
    with pytest.raises(ValueError, match="module 1 is the same object as module 0"):
        fuse_modules([lin, lin], [subject] * 2, [style] * 2)
    fused = fuse_module(lin, subject, style)
    with pytest.raises(ValueError, match="already has a patched forward"):
        fuse_module(lin, subject, style)
    fused.remove()
    assert all("forward" not in m.__dict__ for m in [lin, *mods])


@pytest.mark.parametrize("third", ["not-linear", "shape", "nan", "rank", "method"])
def test_fuse_modules_is_all_or_nothing(third):
    mods = [linear(seed=i) for i in range(3)]
    subject, style = loras()
    subjects, styles = [subject] * 3, [style] * 3
    method = "klora"
    if third == "not-linear":
        mods[2] = nn.Sequential(linear(seed=2))
    elif third == "shape":
        mods[2] = linear(seed=2, in_features=K + 8)
    elif third == "nan":
        styles[2] = (style[0], style[1].clone().fill_(float("inf")), style[2])
    elif third == "rank":
        subjects[2] = (subject[0], torch.randn(N, R_SUBJECT + 1), subject[2])
    else:
        method = "nope"
    x = inputs((2, 7, K))
    with torch.no_grad():
        before = [m(x) if isinstance(m, nn.Linear) and m.in_features == K else None for m in mods]
        with pytest.raises((TypeError, ValueError)) as err:
            fuse_modules(mods, subjects, styles, method)
        assert ("module 2" in str(err.value) or "module2" in str(err.value) or "layer 2" in str(err.value)
                or third == "method"), str(err.value)
        for m, y in zip(mods, before):
            assert all("forward" not in sub.__dict__ for sub in m.modules())
            if y is not None:
                assert torch.equal(m(x), y)
        fused = fuse_modules(mods[:2], subjects[:2], styles[:2], "klora")  # the first two are still patchable
        fused.remove()


def test_public_api_and_docstring_example():
    assert lorafuse.fuse_module is fuse_module and lorafuse.fuse_modules is fuse_modules
    assert lorafuse.integrations.ModuleFusion is ModuleFusion
    linear_ = linear()
    (A_c, B_c, _), (A_s, B_s, _) = loras()
    x = inputs((1, 77, K))
    fused = lorafuse.fuse_module(linear_, subject=(A_c, B_c, 1.0), style=(A_s, B_s, 1.0), method="klora")
    with torch.no_grad():
        for t in (999, 500, 1):
            fused.step(tau=1 - t / 1000)
            y = linear_(x)
            g = fused.decision().gates[0].double()
            close(y, formula64(x, linear_.weight, linear_.bias, [(A_c, B_c, 1.0), (A_s, B_s, 1.0)], g))
    fused.remove()
    assert "forward" not in linear_.__dict__
