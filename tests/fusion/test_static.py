"""K-LoRA and EST-LoRA: decision tables against fp64 dense references, official counter tau,
device-only begin_step, zero LoRAs and input errors."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorafuse.fusion import LayerLoRAs, Progress, get_method
from lorafuse.fusion.schedule import official_tau, time_scale
from lorafuse.kernels import PackedLoRA

from ..conftest import DEVICE
from .reference import decide64, formula64, gamma64, rand_layers, rand_lora, scale64, scores64

STEPS = 50
DEFAULT_BETA = {"s": 0.5, "s*": 1.275}


def table(method, taus, as_tensor):
    rows = []
    for tau in taus:
        method.begin_step(Progress(tau=torch.tensor(tau, dtype=torch.float32 if as_tensor == "fp32" else torch.float64,
                                                    device=DEVICE) if as_tensor else tau))
        rows.append([bool(method.last_decision(l).gates[0, 0]) for l in range(method.num_layers)])
    return rows


def assert_meaningful(ref):
    """The random case exercises both LoRAs and at least one flip over time."""
    flat = [v for row in ref for v in row]
    assert any(flat) and not all(flat)
    assert any(len({row[l] for row in ref}) == 2 for l in range(len(ref[0])))


@pytest.mark.parametrize("pattern", ["s", "s*"])
@pytest.mark.parametrize("name,balance,stats_backend", [
    ("klora", "official", "torch"), ("klora", "paper", "torch"), ("klora", "official", "triton"),
    ("est", "official", "torch"), ("est", "paper", "triton"), ("est", "energy", "torch"),
])
def test_decision_table_matches_fp64_reference(name, balance, stats_backend, pattern):
    layers = rand_layers(12 if stats_backend == "torch" else 5, seed=3)
    sc = scores64(layers, name)
    gamma = gamma64(sc, balance)
    # EST: beta is D; pick D = 0.3 for "s*" so its wrap point sits inside [0, 1)
    beta = DEFAULT_BETA[pattern] if name == "klora" else (0.5 if pattern == "s" else 0.3)
    opts = dict(pattern=pattern, balance=balance, stats_backend=stats_backend)
    opts.update(D=beta) if name == "est" else None
    m = get_method(name, **opts)
    m.prepare(layers, DEVICE)
    assert m.gamma == pytest.approx(gamma, rel=1e-6 if stats_backend == "triton" else 1e-12)
    taus = [k / STEPS for k in range(STEPS)]
    ref = [decide64(sc, gamma, tau, pattern, 1.5, beta) for tau in taus]
    if name == "klora" and balance == "official" and stats_backend == "torch":
        assert_meaningful(ref)
    assert table(m, taus, as_tensor=False) == ref
    assert table(m, taus, as_tensor=True) == ref
    if pattern == "s":  # tau from an fp32 timestep tensor, as the integration passes it
        taus32 = [float(torch.tensor(1.0 - t / 1000.0, dtype=torch.float32)) for t in range(999, 0, -20)]
        ref32 = [decide64(sc, gamma, tau, pattern, 1.5, beta) for tau in taus32]
        assert table(m, taus32, as_tensor="fp32") == ref32


def test_time_scale_host_and_device_agree_bitwise():
    taus = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for pattern, beta in (("s", 0.5), ("s*", 1.275), ("s*", -0.4), ("s*", 2.0)):
        dev = time_scale(taus, pattern, 1.5, beta)
        host = torch.tensor([time_scale(float(t), pattern, 1.5, beta) for t in taus], dtype=torch.float64)
        assert torch.equal(dev, host)
        assert torch.equal(host, torch.tensor([scale64(float(t), pattern, 1.5, beta) for t in taus], dtype=torch.float64))
    s = time_scale(torch.tensor([0.0, 0.1499, 0.15, 0.99]), "s*")
    assert s[0] == pytest.approx(1.275) and s[1] == pytest.approx(1.49985) and s[2] < 1e-6 and s[3] < 1.5


@pytest.mark.parametrize("name", ["klora", "est"])
@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_official_tau_mode_reproduces_counter(name, pattern):
    """The official code: a global counter n = 1, 2, ... over every layer call, tau = (n mod L N)/(L N)."""
    layers = rand_layers(8, seed=5)
    L, N = len(layers), 20
    sc = scores64(layers, name)
    gamma = gamma64(sc, "official")
    beta = DEFAULT_BETA[pattern] if name == "klora" else 0.5
    m = get_method(name, pattern=pattern, tau_mode="official")
    m.prepare(layers, DEVICE)
    x = torch.randn(1, 2, 80, device=DEVICE)
    n, got, ref = 0, [], []
    for image in range(2):  # the counter restarts with every image (step resets to 0)
        for k in range(N):
            m.begin_step(Progress(tau=0.123, step=k, num_steps=N))
            for l in range(L):
                n += 1
                tau = (n % (L * N)) / (L * N)
                assert official_tau(k, l + 1, L, N) == tau
                ref.append(decide64(sc, gamma, tau, pattern, 1.5, beta)[l])
                if image == 0 and k % 7 == 0:  # some calls through layer_forward, the rest through gates()
                    layer = layers[l]
                    K = layer.subject[0].shape[1]
                    W = torch.randn(layer.subject[1].shape[0], K, device=DEVICE)
                    y = m.layer_forward(l, x[..., :K], W, None, PackedLoRA.pack([layer.subject, layer.style]))
                    g = m.last_decision(l).gates[0]
                    torch.testing.assert_close(y.double().cpu(), formula64(x[..., :K], W, None, [layer.subject, layer.style], g),
                                               rtol=1e-4, atol=1e-4)
                else:
                    g = m.gates(l)
                got.append(bool(g[0]))
                assert m.last_decision(l).tau == tau
    assert got == ref
    assert len(set(ref)) == 2


def test_official_mode_needs_num_steps():
    m = get_method("klora", tau_mode="official")
    m.prepare(rand_layers(2))
    with pytest.raises(ValueError, match="num_steps"):
        m.begin_step(Progress(tau=0.0, step=0))
    with pytest.raises(ValueError, match="num_steps"):
        m.gates(0)


class _CountOps(TorchDispatchMode):
    """The ops that compute (views are left out: they launch nothing, and how many an indexing
    expression dispatches changes between torch releases, e.g. ``g[:, 0]`` is slice + select on 2.8)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["klora", "est", "merge", "subject", "style"])
def test_step_path_never_reads_device_values(name, monkeypatch):
    """begin_step / layer_forward with tau as a tensor: no .item()/bool()/float()/int() on a tensor,
    and begin_step costs the same few ops for 4 or 40 layers (no Python loop over layers)."""
    counts = []
    for n in (4, 40):
        layers = rand_layers(n, seed=1)
        m = get_method(name, pattern="s*") if name in ("klora", "est") else get_method(name)
        m.prepare(layers, DEVICE)
        layer = layers[1]
        packed = PackedLoRA.pack([layer.subject, layer.style])
        K, N = layer.subject[0].shape[1], layer.subject[1].shape[0]
        x, W, b = torch.randn(2, 3, K, device=DEVICE), torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
        tau = torch.tensor(0.4, device=DEVICE)
        with monkeypatch.context() as mp:
            for attr in ("item", "__bool__", "__float__", "__int__"):
                mp.setattr(torch.Tensor, attr, lambda *a, _n=attr, **k: pytest.fail(f"host read: Tensor.{_n}"))
            with _CountOps() as c:
                m.begin_step(Progress(tau=tau, step=3, num_steps=50))
            y = m.layer_forward(1, x, W, b, packed)
            d = m.last_decision(1)
        counts.append(len(c.ops))
        torch.testing.assert_close(y.double().cpu(), formula64(x, W, b, [layer.subject, layer.style], d.gates[0]),
                                   rtol=1e-4, atol=1e-4)
    assert counts[0] == counts[1] and counts[0] <= 10, counts


@pytest.mark.parametrize("name", ["klora", "est"])
def test_zero_loras_give_defined_decisions(name):
    K, N = 32, 24
    z = lambda r: (torch.zeros(r, K, device=DEVICE), torch.zeros(N, r, device=DEVICE), 1.0)  # noqa: E731
    layers = [
        LayerLoRAs("zero_subject", z(4), rand_lora(4, K, N, 1.0)),
        LayerLoRAs("zero_style", rand_lora(4, K, N, 1.0), z(8)),
        LayerLoRAs("both_zero", z(4), z(4)),
        LayerLoRAs("zero_scale", rand_lora(4, K, N, 0.0), rand_lora(4, K, N, 1.0)),
        LayerLoRAs("normal", rand_lora(4, K, N, 1.0), rand_lora(4, K, N, 1.0)),
    ]
    for balance in ("official", "paper") + (("energy",) if name == "est" else ()):
        m = get_method(name, balance=balance)
        m.prepare(layers, DEVICE)
        assert math.isfinite(m.gamma) and m.gamma > 0
        for tau in (0.0, 0.5, 0.99):
            m.begin_step(Progress(tau=tau))
            g = torch.stack([m.last_decision(l).gates[0] for l in range(5)]).cpu()
            assert torch.isfinite(g).all()
            assert g[:4, 0].tolist() == [0.0, 1.0, 0.0, 0.0]  # zero subject loses; zero style loses; tie -> style
    # all-zero subject everywhere: gamma undefined -> 1, style always
    m = get_method(name)
    m.prepare([LayerLoRAs("a", z(4), rand_lora(4, K, N, 1.0)), LayerLoRAs("b", z(8), rand_lora(2, K, N, 1.0))], DEVICE)
    assert m.gamma == 1.0 and m.last_decision(0).gates[0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", ["klora", "est", "kl", "merge"])
def test_bad_layers_raise_clear_errors(name):
    K, N = 32, 24
    good = rand_lora(4, K, N, 1.0)
    cases = [
        ([LayerLoRAs("attn.to_q", good, rand_lora(4, K + 1, N, 1.0))], ValueError, r"attn.to_q.*targets"),
        ([LayerLoRAs("attn.to_k", good, rand_lora(4, K, N + 2, 1.0))], ValueError, r"attn.to_k.*targets"),
        ([LayerLoRAs("single", good, None)], ValueError, "no style LoRA"),
        ([LayerLoRAs("nan", good, (good[0].clone().fill_(float("nan")), good[1], 1.0))], ValueError, "non-finite"),
        ([LayerLoRAs("inf", (good[0], good[1], float("inf")), good)], ValueError, "non-finite"),
        ([LayerLoRAs("pair", good, (good[0], good[1]))], TypeError, "triple"),
        ([LayerLoRAs("rank", good, (good[0], good[1][:, :3], 1.0))], ValueError, "r >= 1"),
        ([], ValueError, "non-empty"),
    ]
    for layers, exc, match in cases:
        with pytest.raises(exc, match=match):
            get_method(name).prepare(layers)
