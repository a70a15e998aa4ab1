"""The method registry, the constant-gate methods (merge, subject, style) against a dense fp64 merge,
the progress / time-scale schedule formulas, and the input edge cases every method shares."""

import math
import re

import pytest
import torch

from lorafuse.fusion import (
    METHODS, ConstantGates, ESTLoRA, FusionMethod, KLDynamic, KLoRA, LayerLoRAs, LinearMerge, Progress, StyleOnly,
    SubjectOnly, get_method, method_options, official_tau, tau_from_sigma, tau_from_timestep, time_scale,
)
from lorafuse.fusion import __doc__ as fusion_doc
from lorafuse.kernels import PackedLoRA

from ..conftest import DEVICE
from .reference import dense, rand_layers, rand_lora

OPTIONS = {
    "klora": ("pattern", "alpha", "beta", "balance", "k", "tau_mode", "stats_backend"),
    "est": ("D", "pattern", "alpha", "balance", "tau_mode", "stats_backend"),
    "kl": ("direction", "reduction", "tie", "mode", "compiled"),
    "merge": ("subject_weight", "style_weight"),
    "subject": (),
    "style": (),
}
CLASSES = {"klora": KLoRA, "est": ESTLoRA, "kl": KLDynamic, "merge": LinearMerge, "subject": SubjectOnly, "style": StyleOnly}


# ---------------------------------------------------------------- registry


def test_registry_builds_every_method():
    assert set(METHODS) == set(OPTIONS)
    for name, cls in CLASSES.items():
        for spelling in (name, name.upper(), name.capitalize()):
            m = get_method(spelling)
            assert type(m) is cls and isinstance(m, FusionMethod) and m.name == name
            assert m.dynamic == (name == "kl") and m.num_layers == 0
            assert method_options(spelling) == OPTIONS[name]
        assert get_method(name) is not get_method(name)  # a new instance each time


def test_module_docstring_lists_every_option():
    """The table in lorafuse.fusion's docstring names exactly the options method_options reports."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in fusion_doc.splitlines() if line.strip().startswith('"')]
    assert [name.strip('"') for name, _, _ in rows] == list(METHODS)
    for name, _, options in rows:
        assert options.split(", ") == list(OPTIONS[name.strip('"')] or ["-"]), (name, options)


@pytest.mark.parametrize("name", ["lora", "k-lora", "", None, 3])
def test_unknown_method_names_the_valid_ones(name):
    for call in (lambda: get_method(name), lambda: method_options(name)):
        with pytest.raises(ValueError, match=r"unknown fusion method .*valid names: klora, est, kl, merge, subject, style"):
            call()


@pytest.mark.parametrize("name", list(METHODS))
def test_unknown_option_names_the_valid_ones(name):
    valid = ", ".join(OPTIONS[name]) or "none"
    with pytest.raises(ValueError, match=rf"fusion method '{name}': unknown option\(s\) \['bogus', 'zeta'\]; "
                                         rf"valid options: {valid}$"):
        get_method(name, zeta=1, bogus=2)


BAD_VALUES = [
    ("klora", "pattern", "s**", "pattern must be one of"),
    ("klora", "alpha", float("nan"), "alpha must be a finite float"),
    ("klora", "alpha", "1.5", "alpha must be a finite float"),
    ("klora", "beta", float("inf"), "beta must be a finite float"),
    ("klora", "balance", "energy", "balance must be one of"),  # energy is EST's option only
    ("klora", "k", 0, "k must be a positive int"),
    ("klora", "k", 2.0, "k must be a positive int"),
    ("klora", "k", True, "k must be a positive int"),
    ("klora", "tau_mode", "counter", "tau_mode must be one of"),
    ("klora", "stats_backend", "cuda", "stats_backend must be one of"),
    ("est", "D", None, "D must be a finite float"),
    ("est", "D", float("nan"), "D must be a finite float"),
    ("est", "balance", "l2", "balance must be one of"),
    ("est", "pattern", "S", "pattern must be one of"),
    ("merge", "subject_weight", "1", "subject_weight must be a finite float"),
    ("merge", "style_weight", float("-inf"), "style_weight must be a finite float"),
    ("merge", "style_weight", False, "style_weight must be a finite float"),
]


@pytest.mark.parametrize("name,option,value,message", BAD_VALUES)
def test_bad_option_values(name, option, value, message):
    with pytest.raises(ValueError, match=rf"^{name}: {message}"):
        get_method(name, **{option: value})


@pytest.mark.parametrize("name", ["klora", "est"])
def test_mod_pattern_needs_positive_alpha(name):
    """S*(tau) = (alpha tau + beta) mod alpha is undefined for alpha = 0 (NaN: neither LoRA would be
    selected) and host/device disagree on its sign for alpha < 0: rejected up front."""
    for alpha in (0.0, -1.5):
        with pytest.raises(ValueError, match=r"'s\*'.*needs alpha > 0"):
            get_method(name, pattern="s*", alpha=alpha)
        with pytest.raises(ValueError, match=r"needs alpha > 0"):
            time_scale(0.3, "s*", alpha, 0.5)
    m = get_method(name, pattern="s", alpha=-1.5)  # a falling linear scale is well defined
    m.prepare(rand_layers(3), DEVICE)
    m.begin_step(Progress(tau=0.5))
    assert m.scale(0.5) == -1.5 * 0.5 + (0.5 if name == "klora" else m.D)


# ---------------------------------------------------------------- constant gates vs a dense merge


def dense_merge64(x, W, b, layer, w_c, w_s):
    """y = x (W + w_c dW_c + w_s dW_s)^T + b in fp64: what diffusers' set_adapters computes."""
    merged = W.double().cpu() + w_c * dense(layer.subject) + w_s * dense(layer.style)
    return x.double().cpu() @ merged.t() + (b.double().cpu() if b is not None else 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,options,weights", [
    ("merge", {}, (1.0, 1.0)),
    ("merge", {"subject_weight": 0.5, "style_weight": -1.25}, (0.5, -1.25)),
    ("merge", {"subject_weight": 0.0, "style_weight": 0.0}, (0.0, 0.0)),
    ("subject", {}, (1.0, 0.0)),
    ("style", {}, (0.0, 1.0)),
])
def test_constant_gates_match_dense_merge(name, options, weights, backend):
    layers = rand_layers(3, seed=2)
    m = get_method(name, **options)
    m.prepare(layers, DEVICE)
    assert m.num_layers == 3
    for step, tau in enumerate((0.0, 0.6, torch.tensor(0.99, device=DEVICE))):
        m.begin_step(Progress(tau=tau, step=step))
        for l, layer in enumerate(layers):
            K, N = layer.subject[0].shape[1], layer.subject[1].shape[0]
            x = torch.randn(2, 5, K, device=DEVICE)
            W, b = torch.randn(N, K, device=DEVICE) / K**0.5, torch.randn(N, device=DEVICE) if l != 1 else None
            y = m.layer_forward(l, x, W, b, PackedLoRA.pack([layer.subject, layer.style]), backend=backend)
            ref = dense_merge64(x, W, b, layer, *weights)
            assert y.shape == (2, 5, N) and ((y.double().cpu() - ref).norm() / ref.norm()) < 1e-5
            d = m.last_decision(l)
            assert d.gates.shape == (1, 2) and d.gates.cpu().tolist() == [list(weights)]


def test_constant_gates_class_and_zero_lora():
    """ConstantGates takes any finite (w_c, w_s); a zero LoRA just contributes nothing."""
    m = ConstantGates((0.25, 2.0))
    K, N = 32, 24
    zero = (torch.zeros(4, K, device=DEVICE), torch.zeros(N, 4, device=DEVICE), 1.0)
    layer = LayerLoRAs("attn.to_v", zero, rand_lora(8, K, N, -0.5))
    m.prepare([layer], DEVICE)
    x, W = torch.randn(7, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    y = m.layer_forward(0, x, W, None, PackedLoRA.pack([layer.subject, layer.style]))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double().cpu(), dense_merge64(x, W, None, layer, 0.25, 2.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="constant: weight 1 must be a finite float"):
        ConstantGates((1.0, float("nan")))


# ---------------------------------------------------------------- schedules


def test_tau_from_timestep_and_sigma():
    for t, T in ((999, 1000.0), (500, 1000.0), (0, 1000.0), (250, 500.0)):
        assert tau_from_timestep(t, T) == 1.0 - t / T
    assert tau_from_timestep(999) == pytest.approx(0.001)
    for sigma in (1.0, 0.73, 0.0):
        assert tau_from_sigma(sigma) == 1.0 - sigma
    # tensors in, tensors out, on their device, without a host read
    t = torch.tensor([999, 981, 1], device=DEVICE)  # diffusers' int64 timesteps
    tau = tau_from_timestep(t)
    assert isinstance(tau, torch.Tensor) and tau.is_floating_point() and tau.device == t.device
    torch.testing.assert_close(tau.double().cpu(), 1.0 - t.double().cpu() / 1000.0)
    s = torch.tensor([1.0, 0.5, 0.03125], device=DEVICE)
    assert torch.equal(tau_from_sigma(s).cpu(), torch.tensor([0.0, 0.5, 0.96875]))


def test_official_tau_formula():
    """((k L + l) mod (L N)) / (L N): starts at 1/(L N), rises by 1/(L N) per call, wraps to 0."""
    L, N = 7, 5
    taus = [official_tau(k, l, L, N) for k in range(N) for l in range(1, L + 1)]
    assert taus[0] == 1 / (L * N) and taus[-1] == 0.0
    assert taus[:-1] == [n / (L * N) for n in range(1, L * N)]
    assert official_tau(3, 2, 560, 50) == (3 * 560 + 2) / 28000  # the SDXL constant of the K-LoRA code


def test_time_scale_formulas():
    taus = [0.0, 0.1, 0.15, 0.5, 0.999]
    for tau in taus:
        assert time_scale(tau) == 1.5 * tau + 0.5  # "s", K-LoRA's alpha 1.5, beta 0.5
        assert time_scale(tau, "s", 2.0, 0.3) == 2.0 * tau + 0.3
        assert time_scale(tau, "s*") == math.fmod(1.5 * tau + 1.275, 1.5)  # beta 1.275 = 0.85 alpha
        assert time_scale(tau, "s*", 1.0, -0.25) == (1.0 * tau - 0.25) % 1.0
        assert 0.0 <= time_scale(tau, "s*", 1.0, -0.25) < 1.0
    # s*: rises from 1.275, wraps to 0 at tau = (1.5 - 1.275) / 1.5 = 0.15, then rises again
    assert time_scale(0.1499, "s*") > 1.49 and time_scale(0.15, "s*") < 1e-9
    assert time_scale(0.5, "s*") == pytest.approx(0.525)
    t = torch.tensor(taus, dtype=torch.float64, device=DEVICE)
    for pattern in ("s", "s*"):
        out = time_scale(t, pattern)
        assert isinstance(out, torch.Tensor) and out.device == t.device
        assert out.cpu().tolist() == [time_scale(tau, pattern) for tau in taus]
    with pytest.raises(ValueError, match="pattern must be one of"):
        time_scale(0.5, "linear")


@pytest.mark.parametrize("tau,exc,message", [
    (torch.tensor([0.1, 0.2]), ValueError, "one-element tensor"),
    ("0.5", TypeError, "tau must be a float or a tensor"),
    (True, TypeError, "tau must be a float or a tensor"),
])
def test_bad_tau(tau, exc, message):
    m = get_method("klora")
    m.prepare(rand_layers(2), DEVICE)
    with pytest.raises(exc, match=message):
        m.begin_step(Progress(tau=tau))


@pytest.mark.parametrize("name", ["klora", "est", "kl", "merge", "subject", "style"])
def test_begin_step_before_prepare(name):
    m = get_method(name)
    if name in ("klora", "est"):
        with pytest.raises(RuntimeError, match="call prepare"):
            m.begin_step(Progress(tau=0.0))
    else:  # nothing to update: a no-op
        m.begin_step(Progress(tau=0.0))


# ---------------------------------------------------------------- edge cases shared by every method


ALL = list(METHODS)


@pytest.mark.parametrize("name", ALL)
def test_layers_of_different_shapes_are_fine_across_layers(name):
    """Each layer has its own (N, K): only a layer's subject and style must target the same shape."""
    layers = [
        LayerLoRAs("a", rand_lora(4, 48, 40, 1.0), rand_lora(13, 48, 40, 0.5)),
        LayerLoRAs("b", rand_lora(8, 80, 24, -1.0), rand_lora(8, 80, 24, 1.0)),
    ]
    m = get_method(name)
    m.prepare(layers, DEVICE)
    m.begin_step(Progress(tau=0.2))
    for l, layer in enumerate(layers):
        K, N = layer.subject[0].shape[1], layer.subject[1].shape[0]
        y = m.layer_forward(l, torch.randn(2, 3, K, device=DEVICE), torch.randn(N, K, device=DEVICE), None,
                            PackedLoRA.pack([layer.subject, layer.style]))
        assert y.shape == (2, 3, N) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match=r"layer 1 \(b\): subject LoRA targets \(24 x 80\) but style .* \(40 x 80\)"):
        get_method(name).prepare([layers[0], LayerLoRAs("b", layers[1].subject, rand_lora(8, 80, 40, 1.0))])


@pytest.mark.parametrize("name", ALL)
def test_zero_loras_give_finite_defined_gates(name):
    """All-zero deltas (zero factors or scale 0) in every layer: no NaN, no division by zero, and the
    output is the base linear."""
    K, N = 32, 24
    zero = (torch.zeros(4, K, device=DEVICE), torch.zeros(N, 4, device=DEVICE), 1.0)
    layers = [LayerLoRAs("zeros", zero, zero), LayerLoRAs("scale0", rand_lora(4, K, N, 0.0), rand_lora(8, K, N, 0.0))]
    m = get_method(name)
    m.prepare(layers, DEVICE)
    x, W, b = torch.randn(2, 3, K, device=DEVICE), torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    for tau in (0.0, 0.5, 0.99):
        m.begin_step(Progress(tau=tau))
        for l, layer in enumerate(layers):
            y = m.layer_forward(l, x, W, b, PackedLoRA.pack([layer.subject, layer.style]))
            d = m.last_decision(l)
            assert torch.isfinite(d.gates).all() and set(d.gates.flatten().tolist()) <= {0.0, 1.0}
            for v in d.stats.values():
                assert torch.isfinite(torch.as_tensor(v)).all()
            torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), rtol=1e-5, atol=1e-5)
    if name in ("klora", "est"):
        assert m.gamma == 1.0  # undefined balance falls back to 1


def _bad_layer_sets():
    K, N = 32, 24
    good = rand_lora(4, K, N, 1.0)
    A, B, _ = good
    nan_B = B.clone()
    nan_B[2, 1] = float("nan")
    yield "single LoRA (no subject)", [LayerLoRAs("attn.to_q", None, good)], ValueError, r"to_q\) has no subject LoRA"
    yield "single LoRA (no style)", [LayerLoRAs("attn.to_k", good, None)], ValueError, r"to_k\) has no style LoRA"
    yield "one LayerLoRAs, not a list", LayerLoRAs("x", good, good), ValueError, "non-empty sequence"
    yield "NaN in subject B", [LayerLoRAs("n", (A, nan_B, 1.0), good)], ValueError, r"\(n\) subject LoRA has non-finite"
    yield "inf in style A", [LayerLoRAs("i", good, (A * float("inf"), B, 1.0))], ValueError, r"style LoRA has non-finite"
    yield "NaN scale tensor", [LayerLoRAs("s", good, (A, B, torch.tensor(float("nan"))))], ValueError, "non-finite"
    yield "scale of 2 elements", [LayerLoRAs("s", good, (A, B, torch.ones(2)))], ValueError, "scale must be a float or a 0-d"
    yield "bool scale", [LayerLoRAs("s", (A, B, True), good)], TypeError, "scale must be a float"
    yield "integer factors", [LayerLoRAs("s", (A.int(), B, 1.0), good)], TypeError, "floating point"
    yield "1-D A", [LayerLoRAs("s", (A[0], B, 1.0), good)], ValueError, r"need A \(r, K\) and B \(N, r\)"
    yield "second layer bad", [LayerLoRAs("ok", good, good), LayerLoRAs("late", good, None)], ValueError, r"layer 1 \(late\)"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case,layers,exc,message", list(_bad_layer_sets()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_layers_raise_clear_errors(name, case, layers, exc, message):
    with pytest.raises(exc, match=rf"^{name}: .*{message}"):
        get_method(name).prepare(layers, DEVICE)


@pytest.mark.parametrize("name", ALL)
def test_lora_that_does_not_fit_the_layer_at_forward(name):
    """prepare() only sees the LoRAs; a weight of another shape at forward time is the kernel's clear error."""
    layer = LayerLoRAs("attn.to_q", rand_lora(4, 32, 24, 1.0), rand_lora(8, 32, 24, 1.0))
    m = get_method(name)
    m.prepare([layer], DEVICE)
    m.begin_step(Progress(tau=0.1))
    x = torch.randn(2, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="output features"):
        m.layer_forward(0, x, torch.randn(20, 32, device=DEVICE), None, PackedLoRA.pack([layer.subject, layer.style]))
