"""delta_stats: top-K / L1 / energy of dW = scale * B A against the dense fp64 definitions,

    topk_sum = torch.topk(|dW|.flatten(), k).values.sum(),  l1 = sum |dW|,  energy = ||dW||_F^2,

on the torch and Triton backends (interpreter on CPU), chunked, with ties, and with clear errors."""


import pytest
import torch

from lorafuse.kernels import delta_stats as ds
from lorafuse.kernels.delta_stats import lora_delta_energy, lora_delta_l1, lora_delta_topk_l1, lora_delta_topk_sum

from ..conftest import DEVICE
from .conftest import compiled

BACKENDS = ["torch", "triton"]
# relative error of the top-K / L1 sums: the torch backend works in fp64, the Triton kernel forms the
# products and the per-tile abs-sums in fp32 (input dtypes are upcast exactly, so they don't matter)
REL_TOL = {"torch": 1e-12, "triton": 1e-5}
ENERGY_REL_TOL = 1e-12  # Gram-matrix identity in fp64 vs the dense sum of squares


def dense64(A, B, scale):
    return float(scale) * (B.double().cpu() @ A.double().cpu())


def ref_topk(dW, k):
    a = dW.abs().flatten()
    return torch.topk(a, min(k, a.numel())).values.sum()


def rand_factors(r, K, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64) / r**0.5
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype)


def int_factors(r, K, N, lo=-3, hi=4, seed=0):
    """Small-integer factors: every product and sum is exact in fp32 and fp64, and |dW| has ties."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(lo, hi, (r, K), generator=g).to(DEVICE, torch.float32)
    B = torch.randint(lo, hi, (N, r), generator=g).to(DEVICE, torch.float32)
    return A, B


def assert_rel(got, ref, tol):
    assert got.dtype == torch.float64 and got.shape == ()
    ref = torch.as_tensor(ref, dtype=torch.float64)
    rel = abs(float(got) - float(ref)) / max(abs(float(ref)), 1e-300)
    assert rel <= tol, f"{float(got)!r} vs {float(ref)!r}: relative error {rel:.2e} > {tol:.0e}"


# (r, K, N): odd in/out, ranks 4 and 13 (unequal, not multiples of 16), 20 > one 16-wide rank slice
SHAPES = [(4, 77, 41), (13, 77, 41), (20, 41, 77)]
SCALES = [0.7, -1.3, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"r{s[0]}K{s[1]}N{s[2]}")
def test_topk_l1_energy_match_dense_fp64(shape, dtype, backend):
    r, K, N = shape
    A, B = rand_factors(r, K, N, dtype)
    tol = REL_TOL[backend]
    for scale in SCALES:
        dW = dense64(A, B, scale)
        for k in (1, 4 * 13, N * K, N * K + 7):  # k = r_c r_s of ranks 4 and 13; k > N*K is clamped
            top, l1 = lora_delta_topk_l1(A, B, scale, k, backend=backend)
            if scale == 0.0:
                assert float(top) == 0.0 and float(l1) == 0.0
                continue
            assert_rel(top, ref_topk(dW, k), tol)
            assert_rel(l1, dW.abs().sum(), tol)
            if k == N * K:  # all entries: the top-K sum is the L1 norm
                assert_rel(top, l1, tol)
        energy = lora_delta_energy(A, B, scale)
        if scale == 0.0:
            assert float(energy) == 0.0
        else:
            assert_rel(energy, (dW**2).sum(), ENERGY_REL_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrappers_agree_with_the_one_pass_function(backend):
    A, B = rand_factors(13, 77, 41)
    top, l1 = lora_delta_topk_l1(A, B, -0.6, 52, backend=backend)
    assert torch.equal(lora_delta_topk_sum(A, B, -0.6, 52, backend=backend), top)
    assert torch.equal(lora_delta_l1(A, B, -0.6, backend=backend), l1)
    assert top.device == A.device and l1.device == A.device


def test_bf16_factors_torch_backend():
    A, B = rand_factors(13, 77, 41, torch.bfloat16)
    dW = dense64(A, B, 0.9)  # of the bf16 values themselves, upcast exactly
    top, l1 = lora_delta_topk_l1(A, B, 0.9, 52, backend="torch")
    assert_rel(top, ref_topk(dW, 52), 1e-12)
    assert_rel(l1, dW.abs().sum(), 1e-12)
    assert_rel(lora_delta_energy(A, B, 0.9), (dW**2).sum(), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, -2.0, 0.25])
def test_exact_where_the_math_is_exact(backend, scale):
    """Integer factors, power-of-two scales: every entry, top-K value and sum is exactly representable,
    so both backends must agree with the dense fp64 reference bit for bit."""
    A, B = int_factors(13, 77, 41)
    dW = dense64(A, B, scale)
    for k in (1, 52, 41 * 77):
        top, l1 = lora_delta_topk_l1(A, B, scale, k, backend=backend)
        assert float(top) == float(ref_topk(dW, k))
        assert float(l1) == float(dW.abs().sum())
    assert float(lora_delta_energy(A, B, scale)) == float((dW**2).sum())
    # fp64 factors of arbitrary value on the CPU torch backend: the top-K values are the dense ones
    A64, B64 = rand_factors(13, 77, 41, torch.float64)
    if backend == "torch" and A64.device.type == "cpu":  # same BLAS as the reference
        want = ref_topk(dense64(A64, B64, scale), 52)
        assert float(lora_delta_topk_sum(A64, B64, scale, 52, backend="torch")) == float(want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_in_abs_delta(backend, monkeypatch):
    """Equal |dW| entries of both signs, also straddling the k-th place and the chunk borders."""
    N, K = 41, 77
    signs_b = torch.tensor([(-1.0) ** n for n in range(N)], device=DEVICE)[:, None]
    signs_a = torch.tensor([(-1.0) ** (j // 3) for j in range(K)], device=DEVICE)[None, :]
    A, B = 3.0 * signs_a, 2.0 * signs_b  # rank 1, every |dW| = 6 * |scale|
    for k in (1, 5, 1000, N * K):
        top = lora_delta_topk_sum(A, B, -0.5, k, backend=backend)
        assert float(top) == 3.0 * k
    A, B = int_factors(4, K, N, lo=-1, hi=2)  # |dW| in {0, 1, 2, 3, 4}: heavy ties
    dW = dense64(A, B, 1.0)
    monkeypatch.setattr(ds, "_chunk_rows", lambda K: 5)
    for k in (1, 7, 52, 333, N * K):
        assert float(lora_delta_topk_sum(A, B, 1.0, k, backend=backend)) == float(ref_topk(dW, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_row_chunks(backend, monkeypatch):
    """Chunks of 7 rows (not a multiple of the kernel's 64-row tile), the largest entries all in one
    chunk (each chunk must keep k candidates), and k larger than one chunk."""
    r, K, N = 13, 77, 41
    A, B = rand_factors(r, K, N)
    B[17] *= 40.0  # row 17 (third chunk) holds the top entries
    dW = dense64(A, B, 0.8)
    ref = {k: ref_topk(dW, k) for k in (1, 52, 7 * K + 3, N * K)}
    unchunked = {k: lora_delta_topk_l1(A, B, 0.8, k, backend=backend) for k in ref}

    launches = []
    if backend == "triton":
        real_launch = ds.launch_delta_abs
        monkeypatch.setattr(ds, "launch_delta_abs", lambda *a, **kw: (launches.append(a[3:5]), real_launch(*a, **kw)))
    monkeypatch.setattr(ds, "_chunk_rows", lambda K: 7)
    for k, want in ref.items():
        top, l1 = lora_delta_topk_l1(A, B, 0.8, k, backend=backend)
        assert_rel(top, want, REL_TOL[backend])
        assert_rel(l1, dW.abs().sum(), REL_TOL[backend])
        assert_rel(top, unchunked[k][0], REL_TOL[backend])
    if backend == "triton":
        assert launches[:6] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35), (35, 41)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_follows_chunk_elements(backend, monkeypatch):
    """The real chunking helper: CHUNK_ELEMENTS = 64 K gives 64-row chunks (3 chunks for 150 rows)."""
    r, K, N = 8, 40, 150
    assert ds._chunk_rows(K) % ds.BLOCK_M == 0 and ds._chunk_rows(K) * K <= ds.CHUNK_ELEMENTS
    A, B = rand_factors(r, K, N)
    dW = dense64(A, B, 1.1)
    monkeypatch.setattr(ds, "CHUNK_ELEMENTS", 64 * K + 5)
    assert ds._chunk_rows(K) == 64
    top, l1 = lora_delta_topk_l1(A, B, 1.1, 100, backend=backend)
    assert_rel(top, ref_topk(dW, 100), REL_TOL[backend])
    assert_rel(l1, dW.abs().sum(), REL_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_as_tensor_and_empty_deltas(backend):
    A, B = rand_factors(4, 77, 41)
    want = lora_delta_topk_l1(A, B, -0.75, 52, backend=backend)
    for scale in (torch.tensor(-0.75), torch.tensor([-0.75], dtype=torch.float64)):
        assert lora_delta_topk_l1(A, B, scale, 52, backend=backend) == want
        assert float(lora_delta_energy(A, B, scale)) == float(lora_delta_energy(A, B, -0.75))
    for r, K, N in ((4, 0, 41), (4, 77, 0)):  # an empty dW: every statistic is 0
        A0, B0 = torch.zeros(r, K, device=DEVICE), torch.zeros(N, r, device=DEVICE)
        top, l1 = lora_delta_topk_l1(A0, B0, 1.0, 5, backend=backend)
        assert float(top) == 0.0 and float(l1) == 0.0 and float(lora_delta_energy(A0, B0, 1.0)) == 0.0


def test_auto_backend_is_the_torch_reference_on_cpu():
    A, B = rand_factors(13, 77, 41)
    if A.device.type != "cpu":
        pytest.skip("auto picks Triton on CUDA")
    assert lora_delta_topk_l1(A, B, 0.5, 52) == lora_delta_topk_l1(A, B, 0.5, 52, backend="torch")


# ---------------------------------------------------------------- errors


def _bad_calls():
    A, B = rand_factors(4, 32, 24)
    nan_A, inf_B = A.clone(), B.clone()
    nan_A[1, 3], inf_B[5, 0] = float("nan"), float("inf")
    for name, fn in (("lora_delta_topk_l1", lambda a, b, s: lora_delta_topk_l1(a, b, s, 4)),
                     ("lora_delta_l1", lora_delta_l1), ("lora_delta_energy", lora_delta_energy)):
        yield name, ValueError, "need A (r, K) and B (N, r)", lambda f=fn: f(A, B[:, :3], 1.0)
        yield name, ValueError, "need A (r, K) and B (N, r)", lambda f=fn: f(A[0], B, 1.0)
        yield name, ValueError, "non-finite", lambda f=fn: f(nan_A, B, 1.0)
        yield name, ValueError, "non-finite", lambda f=fn: f(A, inf_B, 1.0)
        yield name, ValueError, "non-finite", lambda f=fn: f(A, B, float("nan"))
        yield name, ValueError, "non-finite", lambda f=fn: f(A, B, torch.tensor(float("-inf")))
        yield name, TypeError, "floating point", lambda f=fn: f(A.to(torch.int32), B, 1.0)
        yield name, TypeError, "floating point", lambda f=fn: f(A, B.to(torch.bool), 1.0)
        yield name, TypeError, "must be tensors", lambda f=fn: f(A.tolist(), B, 1.0)
        yield name, TypeError, "scale must be a float", lambda f=fn: f(A, B, "1.0")
        yield name, TypeError, "scale must be a float", lambda f=fn: f(A, B, True)
        yield name, ValueError, "scale must be a float", lambda f=fn: f(A, B, torch.ones(2))
        yield name, ValueError, "A is on meta", lambda f=fn: f(A.to("meta"), B, 1.0)
    for k in (0, -3, 2.0, True, None):
        yield "lora_delta_topk_l1", ValueError, "k must be a positive int", lambda k=k: lora_delta_topk_l1(A, B, 1.0, k)
    yield "lora_delta_topk", ValueError, "k must be a positive int", lambda: lora_delta_topk_sum(A, B, 1.0, 0)
    yield "lora_delta_topk_l1", ValueError, "backend must be one of", lambda: lora_delta_topk_l1(A, B, 1.0, 4, backend="gpu")
    yield "lora_delta_l1", ValueError, "backend must be one of", lambda: lora_delta_l1(A, B, 1.0, backend="gpu")


@pytest.mark.parametrize("what,exc,message,call", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_clear_errors(what, exc, message, call):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value) and what in str(info.value), str(info.value)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    A, B = rand_factors(4, 32, 24)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        lora_delta_topk_l1(A.cpu(), B.cpu(), 1.0, 4, backend="triton")


# ---------------------------------------------------------------- real-GPU compilation


def test_delta_kernel_compiles_for_sm80_and_sm90(compile_report):
    """compile_check lists the delta kernel (every dtype, with and without the tile store) and each
    variant compiles for sm_80 and sm_90 within shared memory and without register spills."""
    ok = compiled(compile_report, "delta_abs")
    assert len(ok) == 12 and all("STACK:0" in line for line in ok if "STACK:" in line), ok


@pytest.mark.parametrize("case", ["random", "ramp", "reversed_ramp", "all_equal", "few_values", "zeros_and_one"])
@pytest.mark.parametrize("k", [1, 7, 64, 500, 20000, 50000])
def test_filtered_topk_equals_torch_topk(case, k):
    """topk_values (group-maxima threshold, then topk of the survivors) returns exactly torch.topk's
    values, also when the largest entries sit in one group (ramps) or everything ties."""
    n = 40000
    g = torch.Generator().manual_seed(k)
    d = {
        "random": torch.rand(n, generator=g, dtype=torch.float64),
        "ramp": torch.arange(n, dtype=torch.float64),
        "reversed_ramp": torch.arange(n, 0, -1, dtype=torch.float64),
        "all_equal": torch.full((n,), 0.5, dtype=torch.float64),
        "few_values": torch.randint(0, 3, (n,), generator=g).double(),
        "zeros_and_one": torch.zeros(n, dtype=torch.float64).index_fill_(0, torch.tensor([n // 2]), 1.0),
    }[case]
    assert torch.equal(ds.topk_values(d, k), torch.topk(d, min(k, n)).values)
