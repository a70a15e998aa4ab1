"""KL dynamic selection against an fp64 reference written from the paper's formula:

    per token m of sample g:  k_i,m = KL(softmax(f0_m) || softmax(f0_m + d_i,m)) over output channels
                              (or KL(p_i || p0) with direction="reverse"),
    f0 = x W^T + b,  d_i = s_i (x A_i^T) B_i^T,
    D_i,g = mean of k_i over the sample's tokens (reduction="sample") or over all rows ("batch"),
    subject iff D_c > D_s (ties by the tie rule),

and the speculative mode (previous gates in the fused kernel, decide on device, low-rank fix-up of
flipped samples) against the two-pass mode and the dense formula, step by step while decisions flip."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorafuse.fusion import KLDynamic, LayerLoRAs, Progress, get_method
from lorafuse.kernels import PackedLoRA

from ..conftest import DEVICE
from .reference import formula64, kl_decide64, kl_divergences64

BACKENDS = ["torch", "triton"]
# relative Frobenius error of y against the fp64 formula, by activation dtype (as the kernel tests)
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
KL_RTOL = {torch.float32: 2e-3, torch.float16: 3e-2}  # the fused kernel's fp32 statistics vs fp64
MARGIN = 0.05  # every reference decision is taken by at least 5% (fp32 statistics cannot flip it)
SUBJ, STY = 0, 1
TOKENS = 6


def make_layer(name, N, K, ranks, scales, seed, dtype=torch.float32):
    """A layer's subject / style LoRAs of unequal ranks and scales, and its base weight (logits std ~2)."""
    g = torch.Generator().manual_seed(seed)
    loras = [
        ((torch.randn(r, K, generator=g) / K**0.5).to(DEVICE, dtype),
         (torch.randn(N, r, generator=g) / r**0.5).to(DEVICE, dtype), s)
        for r, s in zip(ranks, scales)
    ]
    W = (2 * torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    return LayerLoRAs(name, *loras), W, b


def layers_and_weights(dtype=torch.float32, seed=0):
    return [
        make_layer("down.attn1.to_q", 40, 48, (4, 13), (1.0, -0.8), seed, dtype),
        make_layer("mid.attn2.to_out", 24, 72, (16, 6), (0.7, 1.6), seed + 1, dtype),
    ]


def inputs(layer, pattern, gen, *, boost=3.0, dtype=torch.float32):
    """x (G, TOKENS, K): small noise, plus for pattern[g] = SUBJ (STY) a push along the rows of the
    subject's (style's) A made orthogonal to the other LoRA's A, which grows only that LoRA's delta:
    the sample's KL decision is then known and taken by a wide margin. None: noise only."""
    K = layer.subject[0].shape[1]
    xs = []
    for p in pattern:
        x = 0.15 * torch.randn(TOKENS, K, generator=gen)
        if p is not None:
            own, other = (layer.subject, layer.style) if p == SUBJ else (layer.style, layer.subject)
            A, Q = own[0].float().cpu(), torch.linalg.qr(other[0].float().cpu().t()).Q  # Q: (K, r_other)
            push = torch.randn(TOKENS, A.shape[0], generator=gen) @ A
            push = push - (push @ Q) @ Q.t()
            x = x + boost * push / push.norm(dim=1, keepdim=True)
        xs.append(x)
    return torch.stack(xs).to(DEVICE, dtype)


def reference(layer, x, W, b, direction="forward", reduction="sample", tie="subject"):
    """(decisions per sample, D (G, 2) fp64) and asserts the decisions are clear-cut."""
    D = kl_divergences64(x, W, b, [layer.subject, layer.style], direction, reduction)
    if not torch.equal(D[:, 0], D[:, 1]):
        gap = (D[:, 0] - D[:, 1]).abs() / D.abs().amax(1)
        assert (gap > MARGIN).all(), f"ill-posed case: reference D too close {D.tolist()}"
    return kl_decide64(D, tie), D


def onehot(decisions):
    return torch.tensor([[1.0, 0.0] if s else [0.0, 1.0] for s in decisions])


def assert_close_rel(y, ref, dtype):
    assert y.dtype == dtype and torch.isfinite(y).all()
    err = (y.double().cpu() - ref).norm() / ref.norm()
    assert err < REL_TOL[dtype], f"relative error {err:.2e} > {REL_TOL[dtype]:.0e}"


def check_call(method, l, layer, x, W, b, packed, backend, dtype=torch.float32, **ref_opts):
    """One layer call: gates equal the reference decisions, y the formula with those gates, D the
    reference divergences. Returns (y, reference decisions)."""
    want, D = reference(layer, x, W, b, **ref_opts)
    y = method.layer_forward(l, x, W, b, packed, backend=backend)
    dec = method.last_decision(l)
    G = x.shape[0]
    assert dec.gates.shape == (G, 2) and dec.gates.dtype == torch.float32
    assert torch.equal(dec.gates.cpu(), onehot(want)), (dec.gates.tolist(), want)
    torch.testing.assert_close(dec.stats["kl"].double().cpu(), D, rtol=KL_RTOL[dtype], atol=1e-6)
    assert_close_rel(y, formula64(x, W, b, [layer.subject, layer.style], onehot(want)), dtype)
    return y, want


# ---------------------------------------------------------------- (a) decisions vs the fp64 reference

PATTERNS = [[SUBJ, STY, SUBJ, STY], [STY, SUBJ, SUBJ, SUBJ], [STY, STY, STY, SUBJ]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction,reduction,tie", [
    ("forward", "sample", "subject"), ("reverse", "sample", "style"), ("forward", "batch", "style"),
    ("reverse", "batch", "subject"),
])
def test_decisions_match_fp64_reference(backend, direction, reduction, tie):
    opts = dict(direction=direction, reduction=reduction, tie=tie)
    m = get_method("kl", **opts)
    lw = layers_and_weights(seed=3)
    m.prepare([layer for layer, _, _ in lw], DEVICE)
    gen = torch.Generator().manual_seed(11)
    seen = []
    patterns = PATTERNS if backend == "torch" else PATTERNS[:2]
    for step, pattern in enumerate(patterns):
        m.begin_step(Progress(tau=step / len(patterns)))
        for l, (layer, W, b) in enumerate(lw):
            x = inputs(layer, pattern, gen)
            _, want = check_call(m, l, layer, x, W, b, PackedLoRA.pack([layer.subject, layer.style]), backend, **opts)
            if reduction == "sample":
                assert want == [p == SUBJ for p in pattern]
            seen += want
    assert any(seen) and not all(seen)


def test_direction_and_reduction_change_the_statistic():
    """The reverse KL and the batch mean are different numbers from the defaults (so the checks above
    would notice the wrong one), and a batch decision overrides some samples' own decisions."""
    (layer, W, b), _ = layers_and_weights(seed=3)
    x = inputs(layer, PATTERNS[0], torch.Generator().manual_seed(11))
    fwd = kl_divergences64(x, W, b, [layer.subject, layer.style])
    rev = kl_divergences64(x, W, b, [layer.subject, layer.style], direction="reverse")
    assert ((fwd - rev).abs() / fwd > 10 * KL_RTOL[torch.float32]).any()
    per_sample = kl_decide64(fwd)
    batch = kl_decide64(kl_divergences64(x, W, b, [layer.subject, layer.style], reduction="batch"))
    assert len(set(batch)) == 1 and set(per_sample) == {True, False}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["speculative", "two_pass"])
def test_tie_rules_and_zero_loras(backend, mode):
    """Two zero LoRAs tie exactly (the KL of a zero delta is exactly 0): the tie rule decides. A
    single zero LoRA always loses, whatever the rule."""
    (layer, W, b), _ = layers_and_weights(seed=5)
    A, B, s = layer.subject
    zero = (torch.zeros_like(A), torch.zeros_like(B), 1.0)
    cases = {  # name: (subject, style, decision with tie="subject", with tie="style")
        "both_zero": (zero, zero, True, False),
        "zero_scale_both": ((A, B, 0.0), (A, B, 0.0), True, False),
        "zero_subject": (zero, (A, B, s), False, False),
        "zero_style": ((A, B, s), zero, True, True),
    }
    x = inputs(layer, [None] * 3, torch.Generator().manual_seed(2))
    for tie in ("subject", "style"):
        m = get_method("kl", tie=tie, mode=mode)
        m.prepare([LayerLoRAs(name, c, st) for name, (c, st, _, _) in cases.items()], DEVICE)
        for step in range(2 if mode == "speculative" else 1):  # the second call starts from the first's gates
            for l, (name, (c, st, win_s, win_t)) in enumerate(cases.items()):
                y = m.layer_forward(l, x, W, b, PackedLoRA.pack([c, st]), backend=backend)
                gates = m.last_decision(l).gates.cpu()
                want = win_s if tie == "subject" else win_t
                assert torch.equal(gates, onehot([want] * 3)), (name, tie, gates.tolist())
                assert torch.isfinite(m.last_decision(l).stats["kl"]).all()
                assert_close_rel(y, formula64(x, W, b, [c, st], gates), torch.float32)


# ---------------------------------------------------------------- (b) speculative == two-pass, with flips


def flip_schedule(lw, gen, dtype):
    """Per step, per layer: (LayerLoRAs, x, W, b). Steps 0-3 steer each sample by its inputs (some
    samples flip, all flip, none flip); step 4 keeps the inputs neutral and scales the subject up
    (the LoRAs change between steps), step 5 swaps the two LoRAs' roles."""
    patterns = [[SUBJ, STY, SUBJ, STY], [SUBJ, SUBJ, STY, STY], [STY, STY, SUBJ, SUBJ], [STY, STY, SUBJ, SUBJ]]
    steps = []
    for pattern in patterns:
        steps.append([(layer, inputs(layer, pattern, gen, dtype=dtype), W, b) for layer, W, b in lw])
    scaled = [(LayerLoRAs(layer.name, (*layer.subject[:2], 4 * layer.subject[2]), layer.style), W, b)
              for layer, W, b in lw]
    steps.append([(layer, inputs(layer, [None] * 4, gen, dtype=dtype), W, b) for layer, W, b in scaled])
    swapped = [(LayerLoRAs(layer.name, layer.style, layer.subject), W, b) for layer, W, b in lw]
    steps.append([(layer, inputs(layer, [STY, SUBJ, STY, SUBJ], gen, dtype=dtype), W, b) for layer, W, b in swapped])
    return steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_speculative_equals_two_pass_through_flips(backend, dtype):
    lw = layers_and_weights(dtype, seed=7)[: 2 if dtype == torch.float32 else 1]  # 2 layers: per-layer state
    spec, ref = get_method("kl"), get_method("kl", mode="two_pass")
    for m in (spec, ref):
        m.prepare([layer for layer, _, _ in lw], DEVICE)
    prev = [[True] * 4 for _ in lw]  # the speculative state starts at the tie rule's LoRA (subject)
    flips = []
    for step, calls in enumerate(flip_schedule(lw, torch.Generator().manual_seed(4), dtype)):
        for m in (spec, ref):
            m.begin_step(Progress(tau=torch.tensor(step / 6, device=DEVICE)))
        for l, (layer, x, W, b) in enumerate(calls):
            packed = PackedLoRA.pack([layer.subject, layer.style], dtype=dtype)
            y_spec, want = check_call(spec, l, layer, x, W, b, packed, backend, dtype)
            y_ref, _ = check_call(ref, l, layer, x, W, b, packed, backend, dtype)
            err = (y_spec.double() - y_ref.double()).norm() / y_ref.double().norm()
            assert err < 2 * REL_TOL[dtype], f"step {step} layer {l}: speculative vs two-pass {err:.2e}"
            flips.append(sum(a != p for a, p in zip(want, prev[l])))
            prev[l] = want
    assert 0 in flips and 4 in flips and any(0 < f < 4 for f in flips), flips


def test_fixup_is_what_corrects_the_speculation(monkeypatch):
    """Without the fix-up the speculative (Triton) output keeps the previous gates on flipped samples."""
    import lorafuse.kernels.api as api

    (layer, W, b), _ = layers_and_weights(seed=7)
    m = get_method("kl")
    m.prepare([layer], DEVICE)
    packed = PackedLoRA.pack([layer.subject, layer.style])
    x = inputs(layer, [SUBJ, STY], torch.Generator().manual_seed(4))
    monkeypatch.setattr(api, "lora_fixup", lambda y, *a, **k: y)
    y = m.layer_forward(0, x, W, b, packed, backend="triton")
    assert m.last_decision(0).gates.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    stale = formula64(x, W, b, [layer.subject, layer.style], onehot([True, True]))
    assert_close_rel(y, stale, torch.float32)  # sample 1 flipped to style but still has the subject


# ---------------------------------------------------------------- (c) batch size changes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["speculative", "two_pass"])
def test_batch_size_changes_between_steps(backend, mode):
    lw = layers_and_weights(seed=9)[:1]
    layer, W, b = lw[0]
    m = get_method("kl", mode=mode)
    m.prepare([layer], DEVICE)
    packed = PackedLoRA.pack([layer.subject, layer.style])
    gen = torch.Generator().manual_seed(6)
    for pattern in ([STY, SUBJ, STY, SUBJ], [STY, SUBJ], [SUBJ, STY, STY], [STY], [SUBJ, SUBJ, STY, STY]):
        x = inputs(layer, pattern, gen)
        _, want = check_call(m, 0, layer, x, W, b, packed, backend)
        assert want == [p == SUBJ for p in pattern]
    # 2-D input: every row is its own sample
    x = inputs(layer, [SUBJ, STY], gen)[:, 0]
    _, want = check_call(m, 0, layer, x, W, b, packed, backend)
    assert want == [True, False]


# ---------------------------------------------------------------- (e) no host syncs


class _Ops(TorchDispatchMode):
    """Records every aten op; fails on ops that read device values on the host or whose output shape
    depends on them."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNCING or str(func).startswith(self.SYNCING):
            pytest.fail(f"host read in the step path: {func}")
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["speculative", "two_pass"])
def test_step_path_never_reads_device_values(backend, mode, monkeypatch):
    """begin_step + layer_forward + last_decision read no device value (no .item()/bool()/float()/
    int(), no _local_scalar_dense), and the speculative step runs the same ops whether or not a
    decision flips (no Python branch on the decision)."""
    layer, W, b = layers_and_weights(seed=7)[0]
    m = get_method("kl", mode=mode)
    m.prepare([layer], DEVICE)
    packed = PackedLoRA.pack([layer.subject, layer.style])
    gen = torch.Generator().manual_seed(4)
    # warm-up call with the same batch size (allocates the speculative state), then: all flip / none flip
    xs = [inputs(layer, p, gen) for p in ([SUBJ, SUBJ], [STY, STY], [STY, STY])]
    m.layer_forward(0, xs[0], W, b, packed, backend=backend)
    counts, decisions = [], []
    for x in xs[1:]:
        with monkeypatch.context() as mp:
            for attr in ("item", "__bool__", "__float__", "__int__", "tolist"):
                mp.setattr(torch.Tensor, attr, lambda *a, _n=attr, **k: pytest.fail(f"host read: Tensor.{_n}"))
            with _Ops() as ops:
                m.begin_step(Progress(tau=torch.tensor(0.5, device=DEVICE)))
                y = m.layer_forward(0, x, W, b, packed, backend=backend)
                d = m.last_decision(0)
        counts.append(ops.ops)
        decisions.append(d.gates.cpu().clone())
        assert_close_rel(y, formula64(x, W, b, [layer.subject, layer.style], d.gates), torch.float32)
    assert decisions[0].tolist() == decisions[1].tolist() == [[0.0, 1.0]] * 2
    assert counts[0] == counts[1]


# ---------------------------------------------------------------- (f) options and misuse


@pytest.mark.parametrize("option,value", [
    ("direction", "backward"), ("reduction", "token"), ("tie", "random"), ("mode", "fast"), ("mode", None),
])
def test_bad_options_raise_clear_errors(option, value):
    with pytest.raises(ValueError, match=rf"kl: {option} must be one of .*got {value!r}"):
        get_method("kl", **{option: value})
    with pytest.raises(ValueError, match=rf"kl: {option} must be one of"):
        KLDynamic(**{option: value})


def test_defaults_unknown_option_and_layer_index():
    m = get_method("kl")
    assert (m.direction, m.reduction, m.tie, m.mode) == ("forward", "sample", "subject", "speculative")
    assert m.dynamic and m.num_layers == 0
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pattern'\].*direction, reduction, tie, mode"):
        get_method("kl", pattern="s")
    layer, W, b = layers_and_weights()[0]
    packed = PackedLoRA.pack([layer.subject, layer.style])
    x = inputs(layer, [SUBJ], torch.Generator().manual_seed(0))
    with pytest.raises(IndexError, match="prepared 0 layers"):
        m.layer_forward(0, x, W, b, packed)
    m.prepare([layer], DEVICE)
    assert m.num_layers == 1
    for bad in (1, -1):
        with pytest.raises(IndexError, match=f"layer {bad} out of range"):
            m.layer_forward(bad, x, W, b, packed)
    m.begin_step(Progress(tau=0.25))
    d = m.last_decision(0)  # before the layer's first call: no gates applied yet
    assert d.gates.shape == (1, 2) and d.gates.abs().sum() == 0 and d.tau == 0.25 and d.stats == {}


# ---------------------------------------------------------------- (g) launches per call, reset


@pytest.mark.parametrize("direction,reduction,tie", [("forward", "sample", "subject"), ("reverse", "batch", "style")])
def test_triton_path_launches_four_kernels_and_no_torch_glue(direction, reduction, tie):
    """One speculative layer call on the Triton path: shrink, GEMM + statistics, decide, fix-up; no
    aten op that launches a kernel (views and empty allocations only), flipped or not."""
    from benchmarks.launches import count_launches

    layer, W, b = layers_and_weights(seed=7)[0]
    m = get_method("kl", direction=direction, reduction=reduction, tie=tie)
    m.prepare([layer], DEVICE)
    packed = PackedLoRA.pack([layer.subject, layer.style])
    gen = torch.Generator().manual_seed(4)
    m.layer_forward(0, inputs(layer, [SUBJ, STY, SUBJ], gen), W, b, packed, backend="triton")  # state allocated
    for pattern in ([STY, STY, SUBJ], [STY, STY, SUBJ]):  # some flip, then none
        x = inputs(layer, pattern, gen)
        c = count_launches(lambda: (m.layer_forward(0, x, W, b, packed, backend="triton"), m.last_decision(0)))
        assert c.names == ["_lora_shrink_kernel", "_fused_lora_linear_kernel", "_kl_decide_kernel",
                           "_lora_fixup_kernel"], c.names
        assert c.aten == 0, c.aten_names
        assert c.launches <= 4


def test_torch_path_op_budget():
    """The torch path's aten ops per layer call (views included) stay within PEFT's own LoRA forward
    of a layer (24 ops, benchmarks/overhead.py) for the default options, whatever G and the ranks
    (the integration's count is asserted in tests/test_benchmark_smoke.py)."""
    from benchmarks.launches import count_launches

    for seed, pattern in ((3, [SUBJ, STY]), (5, [STY, SUBJ, SUBJ, STY])):
        for layer, W, b in layers_and_weights(seed=seed):
            m = get_method("kl")
            m.prepare([layer], DEVICE)
            packed = PackedLoRA.pack([layer.subject, layer.style])
            x = inputs(layer, pattern, torch.Generator().manual_seed(seed))
            m.layer_forward(0, x, W, b, packed, backend="torch")  # per-layer factors made once
            c = count_launches(lambda: (m.layer_forward(0, x, W, b, packed, backend="torch"), m.last_decision(0)))
            assert c.ops <= 24 and c.triton == 0, c.aten_names


def test_torch_path_entry_keeps_no_state_and_still_checks():
    """On the torch path (backend "torch", or "auto" on a CPU) layer_forward decides from the call
    alone through kl_select_plain: no speculative state is kept, the result is kl_select's, and a
    call kl_select_plain declines still gets kl_select's checks and errors."""
    from lorafuse.kernels import kl_select

    layer, W, b = layers_and_weights(seed=3)[0]
    layer = LayerLoRAs(layer.name, *[(A.cpu(), B.cpu(), s) for A, B, s in (layer.subject, layer.style)])
    W, b = W.cpu(), b.cpu()
    packed = PackedLoRA.pack([layer.subject, layer.style])
    x = inputs(layer, [SUBJ, STY], torch.Generator().manual_seed(1)).cpu()
    for backend in ("torch", "auto"):
        m = get_method("kl")
        m.prepare([layer], "cpu")
        y = m.layer_forward(0, x, W, b, packed, backend=backend)
        assert m._prev == [None]
        want = kl_select(x, W, b, packed, torch.zeros(2, 2), backend="torch")
        assert torch.equal(y, want[0]) and torch.equal(m.last_decision(0).gates, want[1])
        assert m.last_decision(0).gates.tolist() == [[1.0, 0.0], [0.0, 1.0]]
        with pytest.raises(ValueError, match=r"x has 48 input features \(last dim\) but weight is"):
            m.layer_forward(0, x, W[:, :-1], b, packed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_restores_the_initial_speculative_state_in_place(backend, monkeypatch):
    """reset() puts every layer's speculative gates back to the tie rule's LoRA in the same tensors,
    reads no device value, and the calls after it equal a fresh method's bit for bit."""
    lw = layers_and_weights(seed=7)
    layers = [layer for layer, _, _ in lw]
    packs = [PackedLoRA.pack([layer.subject, layer.style]) for layer in layers]
    gen = torch.Generator().manual_seed(4)
    xs = [[inputs(layer, p, gen) for layer, _, _ in lw] for p in ([STY, STY, SUBJ], [SUBJ, STY, STY])]

    def run(m):
        return [m.layer_forward(l, x, W, b, packs[l], backend=backend) for calls in xs
                for l, ((_, W, b), x) in enumerate(zip(lw, calls))]

    m = get_method("kl")
    m.prepare(layers, DEVICE)
    first = run(m)
    states = [t for t in m._prev if t is not None]
    if backend == "triton":
        assert len(states) == 2 and any(s[:, 1].any() for s in states)  # the state moved off the initial gates
    with monkeypatch.context() as mp:
        for attr in ("item", "__bool__", "__float__", "__int__", "tolist"):
            mp.setattr(torch.Tensor, attr, lambda *a, _n=attr, **k: pytest.fail(f"host read: Tensor.{_n}"))
        with _Ops():
            m.reset()
    assert [t for t in m._prev if t is not None] == states  # same tensors (in place)
    for s in states:
        assert s.tolist() == [[1.0, 0.0]] * 3
    again = run(m)
    fresh = get_method("kl")
    fresh.prepare(layers, DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(again, run(fresh)))
    assert all(torch.equal(a, b) for a, b in zip(again, first))


# ---------------------------------------------------------------- (c) the decision from output pieces


@pytest.mark.parametrize("direction,reduction,tie", [
    ("forward", "sample", "subject"), ("reverse", "sample", "style"), ("forward", "batch", "style"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decide_from_outputs_matches_fp64_reference_and_records(direction, reduction, tie, dtype):
    """decide_from_outputs (what an integration calls when the layer ran outside the fused kernel:
    PEFT's forward for DoRA, offload, conv LoRAs) gives the fp64 reference's decisions and
    divergences from f0 = x W^T + b and d_i = s_i (x A_i^T) B_i^T, keeps them as the layer's
    last_decision, and checks its arguments."""
    opts = dict(direction=direction, reduction=reduction, tie=tie)
    m = get_method("kl", **opts)
    lw = layers_and_weights(dtype=torch.float64, seed=3)
    m.prepare([layer for layer, _, _ in lw], "cpu")
    gen = torch.Generator().manual_seed(11)
    for l, (layer, W, b) in enumerate(lw):
        layer64 = LayerLoRAs(layer.name, *((A.cpu(), B.cpu(), s) for A, B, s in (layer.subject, layer.style)))
        W, b = W.cpu(), b.cpu()
        x = inputs(layer64, PATTERNS[l], gen, dtype=torch.float64).cpu()
        want, D = reference(layer64, x, W, b, **opts)
        f0 = x @ W.t() + b
        d = [s * (x @ A.t()) @ B.t() for A, B, s in (layer64.subject, layer64.style)]
        g, got = m.decide_from_outputs(*(t.to(dtype) for t in (f0, *d)), x.shape[0], layer=l)
        assert g.dtype == torch.float32 and torch.equal(g, onehot(want))
        torch.testing.assert_close(got.double(), D, rtol=1e-9 if dtype == torch.float64 else 1e-3, atol=1e-9)
        assert torch.equal(m.last_decision(l).gates, g) and m.last_decision(l).stats["kl"] is got
    zero = torch.zeros(3, 5, 7)  # zero deltas tie exactly: the tie rule decides
    g, D = m.decide_from_outputs(torch.randn(3, 5, 7), zero, zero, 3)
    assert torch.equal(D, torch.zeros(3, 2)) and torch.equal(g, onehot([tie == "subject"] * 3))
    with pytest.raises(ValueError, match="one shape"):
        m.decide_from_outputs(zero, zero, zero[:, :, :3], 3)
    with pytest.raises(ValueError, match="num_samples=2"):
        m.decide_from_outputs(zero, zero, zero, 2)
    with pytest.raises(IndexError):
        m.decide_from_outputs(zero, zero, zero, 3, layer=5)
