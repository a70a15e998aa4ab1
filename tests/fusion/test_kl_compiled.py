"""KL dynamic selection inside ``torch.compile`` graphs (KLDynamic(compiled=...)):

    compiled layer_forward == eager layer_forward: y within fp32 rounding, the same gates, D close,
    for every direction / reduction / tie, odd row counts (77, 41 per sample), bias on and off,
    scales 0 and negative;
    one graph, no graph break (fullgraph=True), no recompile across new inputs of one shape nor
    across layer indices: diffusers' regional compilation runs one block's graph for every block,
    with the layer index a static int in the patched forward's closure (as layer_hook makes it);
    the call's decision is on ``packed.notes`` afterwards (KLDynamic.decision_of).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from lorafuse.fusion import KLDynamic, get_method, method_options
from lorafuse.kernels import PackedLoRA

from ..conftest import DEVICE
from .test_kl import SUBJ, STY, make_layer

OPTIONS = [("forward", "sample", "subject"), ("reverse", "sample", "style"), ("forward", "batch", "style"),
           ("reverse", "batch", "subject")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rows(layer, pattern, tokens, gen):
    """x (G, tokens, K): noise plus, for pattern[g] = SUBJ (STY), a push along the rows of that LoRA's
    A orthogonal to the other's (test_kl.inputs with a row count): clear-cut decisions."""
    K = layer.subject[0].shape[1]
    xs = []
    for p in pattern:
        x = 0.15 * torch.randn(tokens, K, generator=gen)
        own, other = (layer.subject, layer.style) if p == SUBJ else (layer.style, layer.subject)
        A, Q = own[0].float().cpu(), torch.linalg.qr(other[0].float().cpu().t()).Q
        push = torch.randn(tokens, A.shape[0], generator=gen) @ A
        push = push - (push @ Q) @ Q.t()
        xs.append(x + 3.0 * push / push.norm(dim=1, keepdim=True))
    return torch.stack(xs).to(DEVICE)


def setup(scales=(1.0, -0.8), bias=True, **opts):
    layers = [make_layer("a.to_q", 40, 48, (4, 13), scales, 0), make_layer("b.to_k", 40, 48, (16, 6), scales, 1)]
    m = KLDynamic(**opts)
    m.prepare([lw[0] for lw in layers], DEVICE)
    packs = [PackedLoRA.pack([layer.subject, layer.style]) for layer, _, _ in layers]
    return m, [(layer, W, b if bias else None) for layer, W, b in layers], packs


def check_same(m, eager_m, l, x, W, b, packed, compiled_fn):
    y = compiled_fn(l, x, W, b, packed)
    want = eager_m.layer_forward(l, x, W, b, packed, backend="torch")
    ref = eager_m.last_decision(l)
    got = m.decision_of(packed)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.gates, ref.gates), (got.gates.tolist(), ref.gates.tolist())
    torch.testing.assert_close(got.stats["kl"], ref.stats["kl"], rtol=1e-4, atol=1e-6)
    return got.gates


@pytest.mark.parametrize("direction,reduction,tie", OPTIONS)
@pytest.mark.parametrize("tokens,bias", [(77, True), (41, False)])
def test_compiled_matches_eager_one_graph_no_recompiles(direction, reduction, tie, tokens, bias):
    opts = dict(direction=direction, reduction=reduction, tie=tie)
    m, layers, packs = setup(bias=bias, **opts)
    eager_m, _, _ = setup(bias=bias, **opts)
    cnt = CompileCounter()
    fn = torch.compile(lambda l, x, W, b, p: m.layer_forward(l, x, W, b, p), backend=cnt, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    seen = []
    with torch.no_grad():
        for pattern in ([SUBJ, STY, STY], [STY, SUBJ, SUBJ], [SUBJ, SUBJ, STY]):
            for l, (layer, W, b) in enumerate(layers):
                seen += check_same(m, eager_m, l, rows(layer, pattern, tokens, gen), W, b, packs[l], fn)[:, 0].tolist()
    assert cnt.frame_count == 1  # new inputs, two layers: the first graph serves every call
    assert 0 < sum(seen) < len(seen)  # both LoRAs won somewhere


@pytest.mark.parametrize("scales", [(0.0, 0.7), (0.9, 0.0), (0.0, 0.0), (-1.2, -0.5)])
@pytest.mark.parametrize("tie", ["subject", "style"])
def test_zero_and_negative_scales_and_one_dimensional_x(scales, tie):
    m, layers, packs = setup(scales=scales, tie=tie)
    eager_m, _, _ = setup(scales=scales, tie=tie)
    fn = torch.compile(lambda l, x, W, b, p: m.layer_forward(l, x, W, b, p), backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for l, (layer, W, b) in enumerate(layers):
            g = check_same(m, eager_m, l, rows(layer, [SUBJ, STY], 7, gen), W, b, packs[l], fn)
            if scales == (0.0, 0.0):  # k = 0 exactly for both: the tie rule decides
                assert g[:, 0].tolist() == [float(tie == "subject")] * 2
            check_same(m, eager_m, l, rows(layer, [STY], 1, gen)[0, 0], W, b, packs[l], fn)  # x (K,)


def test_inductor_matches_eager():
    m, layers, packs = setup()
    eager_m, _, _ = setup()
    fn = torch.compile(lambda l, x, W, b, p: m.layer_forward(l, x, W, b, p), backend="inductor", fullgraph=True)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for l, (layer, W, b) in enumerate(layers):
            check_same(m, eager_m, l, rows(layer, [SUBJ, STY], 41, gen), W, b, packs[l], fn)


class _Patched(torch.nn.Module):
    """A LoRA linear as layer_hook patches it: an instance forward whose closure holds the layer
    index (a static int to dynamo) and finds the layer's pack."""

    def __init__(self, method, index, layer, W, b, packed):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(W, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
        self.layer, self.packed = layer, packed
        cache = {torch.float32: packed}

        def forward(x):
            return method.layer_forward(index, x, self.weight, self.bias, cache.get(x.dtype))

        self.forward = forward


class _Block(torch.nn.Module):
    def __init__(self, method, first, layers):
        super().__init__()
        self.q, self.k = (_Patched(method, first + i, *lw, PackedLoRA.pack([lw[0].subject, lw[0].style]))
                          for i, lw in enumerate(layers))

    def forward(self, x):
        return self.k(torch.tanh(self.q(x)[..., :48]))


@pytest.mark.parametrize("compiled", ["auto", "plain"])
def test_regional_compilation_one_graph_for_every_block_and_decisions_per_layer(compiled):
    """Three blocks, each compiled on its own (``module.compile()``, as diffusers'
    ``compile_repeated_blocks``), two steps: one graph in all, no graph break, and after each block
    call every layer's decision is its own (eager reference per layer)."""
    from torch._dynamo.utils import counters

    lw = [make_layer(f"l{i}", 48 + 8 * (i % 2 == 0), 48, (4, 13), (1.0, -0.8), i) for i in range(6)]
    m = get_method("kl", compiled=compiled)
    m.prepare([layer for layer, _, _ in lw], DEVICE)
    eager_m = get_method("kl")
    eager_m.prepare([layer for layer, _, _ in lw], DEVICE)
    blocks = [_Block(m, 2 * i, lw[2 * i: 2 * i + 2]).to(DEVICE) for i in range(3)]
    cnt = CompileCounter()
    for blk in blocks:
        blk.compile(backend=cnt, fullgraph=True)
    counters.clear()
    gen = torch.Generator().manual_seed(4)
    decided = []
    with torch.no_grad():
        for step in range(2):
            x = (torch.randn(2, 9, 48, generator=gen) * (0.5 + step)).to(DEVICE)
            for blk in blocks:
                y = blk(x)
                h = eager_m.layer_forward(blk.q.layer and 0, x, blk.q.weight, blk.q.bias, blk.q.packed)
                want = eager_m.layer_forward(1, torch.tanh(h[..., :48]), blk.k.weight, blk.k.bias, blk.k.packed)
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
                for mod, ref_layer in ((blk.q, 0), (blk.k, 1)):
                    got, ref = m.decision_of(mod.packed), eager_m.last_decision(ref_layer)
                    assert torch.equal(got.gates, ref.gates) and got.fresh
                    torch.testing.assert_close(got.stats["kl"], ref.stats["kl"], rtol=1e-4, atol=1e-6)
                    decided.append(got.stats["kl"])
                x = y[..., :48]
    assert cnt.frame_count == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    assert len({tuple(d.flatten().tolist()) for d in decided}) == len(decided)  # each call's own record


def test_compiled_switch_validation_and_options():
    assert "compiled" in method_options("kl")
    assert get_method("kl").compiled == "auto"
    with pytest.raises(ValueError, match=r"kl: compiled must be one of .*got 'triton'"):
        get_method("kl", compiled="triton")
    m, _, packs = setup()
    assert m.decision_of(packs[0]) is None  # no compiled call used this pack yet


def test_compiled_errors_are_the_eager_ones():
    """A call that is not plain (here: weight of another dtype) reaches kl_select's full checks and
    raises their error inside the graph too."""
    m, layers, packs = setup()
    layer, W, b = layers[0]
    x = rows(layer, [SUBJ], 5, torch.Generator().manual_seed(0))
    fn = torch.compile(lambda x, W, b, p: m.layer_forward(0, x, W, b, p), backend="aot_eager", fullgraph=True)
    why = "weight is torch.float64 but x is torch.float32"
    with pytest.raises(TypeError, match=why):
        m.layer_forward(0, x, W.double(), b, packs[0])  # the eager error
    with pytest.raises(Exception) as got:
        fn(x, W.double(), b, packs[0])
    # the same error from the graph; torch 2.8's dynamo re-raises it as "Observed exception" (fullgraph)
    assert why in str(got.value) or "Observed exception" in str(got.value), got.value


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton ops need CUDA or the interpreter")
def test_kernels_switch_traces_the_triton_ops():
    """compiled="kernels": the registered Triton ops in the graph (fused GEMM + statistics, kl_decide,
    lora_fixup), speculating the tie rule's LoRA; the same result as the plain ops."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    m, layers, packs = setup(compiled="kernels")
    eager_m, _, _ = setup()
    rec = EagerAndRecordGraphs()
    fn = torch.compile(lambda l, x, W, b, p: m.layer_forward(l, x, W, b, p), backend=rec, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l, (layer, W, b) in enumerate(layers):
            check_same(m, eager_m, l, rows(layer, [STY, SUBJ], 6, gen), W, b, packs[l], fn)
    code = rec.graphs[0].code
    assert "lorafuse.kl_decide" in code and "lorafuse.lora_fixup" in code and "lorafuse.fused_lora_linear" in code
    assert len(rec.graphs) == 2  # the op takes the ranks as constants: (4, 13) and (16, 6) compile apart
