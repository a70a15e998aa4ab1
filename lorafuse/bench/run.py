"""Per-layer forward benchmark of one patched linear: every provider of :mod:`lorafuse.bench.providers` on
the SDXL and FLUX shapes below, timed in one process so every ratio compares numbers of the same run.

    lorafuse bench [--device cuda|cpu] [--quick] [--plot] [--csv PATH]
    python -m benchmarks.run [same options]        (from a checkout of the repository)

It lives in the package, so that ``lorafuse bench`` works from an installed wheel; the repository's
``benchmarks/`` keeps the other benchmarks and the committed results, and re-exports it.

What is measured, per case (shape, rank, dtype, gates) and provider:
- time per call. GPU: ``triton.testing.do_bench`` (CUDA events, median and p20/p80, warm-up) and the
  CUDA-graph replay variant ``do_bench_cudagraph``. CPU: wall clock (``time.perf_counter``), medians of
  interleaved rounds (every round runs every provider, in a shifted order) after a warm-up.
  Each call cycles through several independent input sets (weights, LoRAs and x) whose total size is
  at least twice the last-level cache, so repeated calls do not measure a warm cache.
- ratios to ``F.linear`` and to PEFT eager measured in the same run (``F.linear_repeat`` times
  ``F.linear`` a second time: its ratio is the noise of the run).
- peak extra memory over ``F.linear`` during one call. GPU: ``max_memory_allocated``; CPU: the peak of
  live bytes of the tensors that aten ops create during the call (a TorchDispatchMode tracker).
- roofline: ideal time ``max(FLOPs / peak FLOP/s, bytes / peak B/s)`` with both peaks measured at the
  start of the run (a large copy, a large GEMM), and each provider's time over it.
- rel err: ||y - ref|| / ||ref|| against an upcast reference (fp64 on CPU, fp32 on GPU), so a wrong
  provider cannot be timed silently.

Rows are appended to ``./lorafuse-bench/results.csv`` under the current directory (``--csv PATH``
to choose; the committed results: ``--csv benchmarks/results/results.csv``); ``--plot`` writes one PNG
per shape to ``./lorafuse-bench/plots/`` (``--plot-dir``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch

from . import options
from . import providers as P
from .load import cpu_ticks
from .load import other_cpu_share as _other_cpu_share

HERE = Path(__file__).resolve().parent  # git reads the commit from here (a checkout; "unknown" in a wheel)

# (name, M, K, N): SDXL 1024^2 with CFG, FLUX 1024^2
SHAPES = [
    ("sdxl_64px", 8192, 640, 640),
    ("sdxl_32px", 2048, 1280, 1280),
    ("sdxl_xattn_kv", 154, 2048, 1280),
    ("flux_attn", 4096, 3072, 3072),
    ("flux_mlp", 4608, 3072, 12288),
]
RANKS = (4, 8, 16, 64)
# CPU: M divided so that the whole sweep takes a few minutes on 2 cores (K and N are kept)
CPU_M_DIVISOR = {"sdxl_64px": 8, "sdxl_32px": 4, "sdxl_xattn_kv": 1, "flux_attn": 16, "flux_mlp": 32}
GATES = {"both": (1.0, 0.8), "onehot": (1.0, 0.0)}
# the issue's CPU case: fp32, 2048x1280 -> 1280, two rank-8 LoRAs, unscaled
ISSUE_CPU = ("issue_cpu", 2048, 1280, 1280, 8)
CSV_FIELDS = [
    "date", "kernel", "provider", "shape", "rank", "dtype", "gates", "mode", "median_ms", "p20_ms", "p80_ms",
    "vs_flinear", "vs_peft", "extra_mem_mb", "ideal_ms", "x_ideal", "rel_err", "input_sets", "rounds",
    "cpu_scaled_from", "other_cpu", "load_avg", "device", "torch", "triton", "git_commit",
]


# ----------------------------------------------------------------------------------------- helpers
def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def _last_level_cache(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
            return int(text[:-1]) << (10 if text.endswith("K") else 20 if text.endswith("M") else 0)
        except (OSError, ValueError):
            continue
    return 32 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------ peaks
def _wall(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _best(fn, reps: int) -> float:
    """Fastest of ``reps`` calls after one warm-up (a ceiling: the least disturbed call)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_peaks(device: torch.device, dtypes, copy_mb: int | None = None, gemm_n: int | None = None) -> dict:
    """Measured ceilings of this device: copy bandwidth (bytes read + written per second) and GEMM
    FLOP/s per dtype (a large ``torch.mm`` on random data)."""
    peaks = {}
    numel = ((copy_mb or (512 if device.type == "cuda" else 256)) << 20) // 4
    a = torch.randn(numel, device=device)
    b = torch.empty_like(a)
    if device.type == "cuda":
        from triton.testing import do_bench

        t = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median") * 1e-3
    else:
        t = _best(lambda: b.copy_(a), 5)
    peaks["bytes_per_s"] = 2 * a.numel() * 4 / t
    del a, b
    n = gemm_n or (8192 if device.type == "cuda" else 2048)
    for dtype in dtypes:
        x = torch.randn(n, n, device=device).to(dtype)
        w = torch.randn(n, n, device=device).to(dtype)
        if device.type == "cuda":
            from triton.testing import do_bench

            t = do_bench(lambda: x @ w, warmup=25, rep=200, return_mode="median") * 1e-3
        else:
            t = _best(lambda: x @ w, 5)
        peaks[dtype] = 2.0 * n**3 / t
    return peaks


# ----------------------------------------------------------------------------------------- memory
class _LiveBytes:
    """Peak bytes of live tensors that aten ops create while active (CPU memory of one call).

    Every op output whose storage is not one of the op's inputs' storages is a new allocation; a weak
    finalizer on its storage subtracts it again when the storage is freed. Workspace an op allocates
    and frees internally is not seen."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out, args, kwargs)
                return out

        self.mode, self.cur, self.peak, self.live = Mode(), 0, 0, set()

    def _record(self, out, args, kwargs):
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in inputs or ptr in self.live or st.nbytes() == 0:
                continue
            self.live.add(ptr)
            self.cur += st.nbytes()
            self.peak = max(self.peak, self.cur)
            weakref.finalize(st, self._free, ptr, st.nbytes())

    def _free(self, ptr: int, nbytes: int) -> None:
        if ptr in self.live:
            self.live.discard(ptr)
            self.cur -= nbytes

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` beyond what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        y = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del y
        return peak
    with _LiveBytes() as tracker:
        y = fn()
    del y
    return tracker.peak


# ----------------------------------------------------------------------------------------- timing
def other_cpu_share(before, after, seconds: float) -> float:
    """Fraction of the machine's CPU time that other processes used between two :func:`cpu_ticks`
    (NaN where /proc is missing)."""
    share = _other_cpu_share(before, after, seconds)
    return math.nan if share is None else share


def _rotating(fns):
    state = [0]

    def call():
        i = state[0]
        state[0] = (i + 1) % len(fns)
        return fns[i]()

    return call


def time_gpu(calls: dict, quick: bool) -> dict:
    """{provider: {"events": (med, p20, p80) ms, "cudagraph": (...)}} via triton.testing."""
    from triton.testing import do_bench, do_bench_cudagraph

    out = {}
    q = [0.5, 0.2, 0.8]
    for name, fn in calls.items():
        res = {"events": tuple(do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 100, quantiles=q))}
        try:
            res["cudagraph"] = tuple(do_bench_cudagraph(fn, rep=10 if quick else 20, quantiles=q))
        except Exception as err:  # noqa: BLE001 - report, keep benchmarking the others
            print(f"  {name}: CUDA-graph capture failed: {type(err).__name__}: {str(err)[:120]}")
            res["cudagraph"] = (math.nan,) * 3
            torch.cuda.synchronize()
        out[name] = res
    return out


def time_cpu(calls: dict, rounds: int, n_sets: int) -> dict:
    """{provider: {"wallclock": (med, p20, p80) ms}}: interleaved rounds, each round every provider once
    (order shifted by one each round); a sample is ``inner`` calls (>= 1, enough for ~2 ms)."""
    names = list(calls)
    inner = {}
    for name in names:  # warm-up: one full cycle of the input sets, then size the inner loop
        for _ in range(n_sets):
            calls[name]()
        t0 = time.perf_counter()
        calls[name]()
        inner[name] = max(1, math.ceil(2e-3 / max(time.perf_counter() - t0, 1e-9)))
    samples = {name: [] for name in names}
    ticks, t_start = cpu_ticks(), time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, k = calls[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k * 1e3)
    busy = other_cpu_share(ticks, cpu_ticks(), time.perf_counter() - t_start)
    out = {}
    for name, s in samples.items():
        qs = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        out[name] = {"wallclock": (statistics.median(s), qs[1], qs[7])}
    out["_other_cpu"] = busy
    return out


# ------------------------------------------------------------------------------------------ cases
def plan(device: torch.device, quick: bool, args) -> list[tuple[str, P.Case, str]]:
    """(shape label, case, note) of the run; CPU shapes scaled down (note says from what)."""
    cuda = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else (
        [torch.float16, torch.bfloat16] if cuda else [torch.float32])
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else (
        ([8, 64] if cuda else [8]) if quick else list(RANKS))
    gate_modes = args.gates.split(",") if args.gates else ["both"]
    if args.shapes:
        shapes = []
        for i, s in enumerate(args.shapes.split(",")):
            M, K, N = (int(v) for v in s.lower().split("x"))
            shapes.append((f"custom{i}", M, K, N))
    else:
        shapes = SHAPES[:2] if quick else SHAPES
    cases = []
    if not cuda and not args.shapes:  # the issue's CPU case first, unscaled, both gate modes
        name, M, K, N, r = ISSUE_CPU
        for gm in ("both",) if quick else ("both", "onehot"):
            cases.append((name, P.Case(M, K, N, r, torch.float32, gates=GATES[gm]), ""))
    for name, M, K, N in shapes:
        note = ""
        if not cuda and not args.shapes:
            div = CPU_M_DIVISOR.get(name, 1)
            note = f"{M}x{K}x{N}" if div > 1 else ""
            M //= div
        for dtype in dtypes:
            for r in ranks:
                for gm in gate_modes:
                    cases.append((name, P.Case(M, K, N, r, dtype, gates=GATES[gm]), note))
    return cases


def run_case(label: str, case: P.Case, device: torch.device, args, peaks: dict, backend: str) -> list[dict]:
    names = [n for n in P.PROVIDERS if not args.providers or n in args.providers.split(",")]
    if "F.linear" not in names:
        names.insert(0, "F.linear")
    set_bytes = P.make_layer(P.Case(1, case.K, case.N, case.rank, case.dtype), "cpu").nbytes + (
        case.M * (case.K + case.N) * torch.finfo(case.dtype).bits // 8)
    n_sets = min(16 if device.type == "cuda" else 4, max(2, math.ceil(2 * _last_level_cache(device) / set_bytes)))
    layers = [P.make_layer(case, device, seed=s) for s in range(n_sets)]
    per_set = {n: [P.build(n, layer, backend) for layer in layers] for n in names}

    ref = P.reference(layers[0], *((torch.float64, "cpu") if device.type == "cpu" else (torch.float32, device)))
    errs = {}
    for n in names:
        y = per_set[n][0]().to(ref.dtype)
        sync(device)
        errs[n] = float((y - ref).norm() / ref.norm())
    mem = {n: peak_memory(per_set[n][0], device) for n in names}
    del ref, y

    calls = {n: _rotating(per_set[n]) for n in names}
    calls["F.linear_repeat"] = _rotating(per_set["F.linear"])  # the run's noise: same code timed twice
    errs["F.linear_repeat"], mem["F.linear_repeat"] = errs["F.linear"], mem["F.linear"]
    rounds = args.rounds or (3 if args.quick else 5) * (3 if label == ISSUE_CPU[0] else 1)
    times = time_gpu(calls, args.quick) if device.type == "cuda" else time_cpu(calls, rounds, n_sets)

    other = times.pop("_other_cpu", math.nan)
    rows = []
    for mode in times["F.linear"]:
        base = times["F.linear"][mode][0]
        peft = times["peft_eager"][mode][0] if "peft_eager" in times else math.nan
        for n, t in times.items():
            flops, nbytes = P.work(case, "F.linear" if n == "F.linear_repeat" else n)
            ideal = max(flops / peaks[case.dtype], nbytes / peaks["bytes_per_s"]) * 1e3
            rows.append({
                "provider": n, "shape": case.shape, "label": label, "rank": case.rank,
                "dtype": _dtype_name(case.dtype), "gates": case.gate_name, "mode": mode,
                "median_ms": t[mode][0], "p20_ms": t[mode][1], "p80_ms": t[mode][2],
                "vs_flinear": t[mode][0] / base, "vs_peft": t[mode][0] / peft,
                "extra_mem_mb": (mem[n] - mem["F.linear"]) / 2**20, "ideal_ms": ideal,
                "x_ideal": t[mode][0] / ideal, "rel_err": errs[n], "input_sets": n_sets,
                "rounds": "" if device.type == "cuda" else rounds, "other_cpu": other,
            })
    del per_set, calls, layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ output
def print_table(label: str, case: P.Case, note: str, rows: list[dict]) -> None:
    scaled = f"  [CPU-scaled from {note}: M reduced]" if note else ""
    other = rows[0].get("other_cpu", math.nan)
    busy = f", other processes used {other:.0%} of the CPU meanwhile" if other == other else ""
    print(f"\n{label} {case.shape} rank {case.rank}x2 {_dtype_name(case.dtype)} gates={case.gate_name} "
          f"{case.gates}, {rows[0]['input_sets']} rotating input sets{busy}{scaled}")
    print(f"  {'provider':16s} {'mode':9s} {'median ms':>10s} {'p20-p80 ms':>17s} {'x F.lin':>8s} {'x PEFT':>7s} "
          f"{'+mem MB':>8s} {'ideal ms':>9s} {'x ideal':>8s} {'rel err':>8s}")
    for r in rows:
        print(f"  {r['provider']:16s} {r['mode']:9s} {r['median_ms']:10.3f} {r['p20_ms']:8.3f}-{r['p80_ms']:<8.3f} "
              f"{r['vs_flinear']:8.2f} {r['vs_peft']:7.2f} {r['extra_mem_mb']:8.1f} {r['ideal_ms']:9.3f} "
              f"{r['x_ideal']:8.1f} {r['rel_err']:8.1e}")


def append_rows(path: Path, fields: list[str], rows, extrasaction: str = "raise") -> None:
    """Append ``rows`` (dicts) to the CSV at ``path`` with columns ``fields``, writing the header when
    the file is new or empty (the results files of every benchmark grow this way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction=extrasaction)
        if new:
            w.writeheader()
        w.writerows(rows)


def append_csv(path: Path, rows: list[dict], meta: dict) -> None:
    append_rows(path, CSV_FIELDS, ({**meta, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}}
                                   for r in rows), extrasaction="ignore")


def plot(all_rows: list[dict], out_dir: Path, device_tag: str) -> list[Path]:
    """One PNG per (shape, dtype, gates, mode): median ms per provider, grouped by rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[dict]] = {}
    for r in all_rows:
        groups.setdefault((r["label"], r["shape"], r["dtype"], r["gates"], r["mode"]), []).append(r)
    paths = []
    for (label, shape, dtype, gates, mode), rows in groups.items():
        ranks = sorted({r["rank"] for r in rows})
        provs = list(dict.fromkeys(r["provider"] for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ranks) * len(provs) / 4), 4))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            vals = [next((r["median_ms"] for r in rows if r["rank"] == k and r["provider"] == p), math.nan) for k in ranks]
            ax.bar([i + j * width for i in range(len(ranks))], vals, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ranks))], [f"rank {k}" for k in ranks])
        ax.set_ylabel(f"median ms per call ({mode})")
        ax.set_title(f"{label} {shape} {dtype} gates={gates} ({device_tag})", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{device_tag}_{label}_{shape}_{dtype}_{gates}_{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------- main
build_parser = options.build_parser


def main(argv: list[str] | None = None) -> int:
    return run(options.resolve_paths(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    """The benchmark for parsed options (:func:`options.resolve_paths` applied)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cases = plan(device, args.quick, args)
    t_start = time.perf_counter()
    peaks = measure_peaks(device, sorted({c.dtype for _, c, _ in cases}, key=str), args.probe_copy_mb, args.probe_gemm_n)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "kernel": "fused_lora_linear",
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
        "git_commit": git_commit(),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"lorafuse per-layer benchmark on {meta['device']} | torch {meta['torch']} triton {meta['triton']} "
          f"| commit {meta['git_commit']} | {meta['date']} | 1-min load average at start {load:.2f}")
    if device.type == "cpu" and load > 0.5:
        print("WARNING: other processes are using the CPU; wall-clock numbers (ratios too) are disturbed.")
    print("measured peaks: copy {:.1f} GB/s; GEMM {}".format(peaks["bytes_per_s"] / 1e9, ", ".join(
        f"{_dtype_name(d)} {v / 1e12:.2f} TFLOP/s" for d, v in peaks.items() if d != "bytes_per_s")))
    if device.type == "cpu" and not args.shapes:
        print("CPU: the SDXL/FLUX shapes run with M scaled down (noted per case); the issue case 2048x1280x1280 is unscaled.")
    all_rows = []
    for i, (label, case, note) in enumerate(cases):
        if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
            left = ", ".join(f"{lb} {c.shape} r{c.rank} {_dtype_name(c.dtype)}" for lb, c, _ in cases[i:])
            print(f"time limit of {args.time_limit:.0f} s reached: {len(cases) - i} case(s) not run: {left}")
            break
        rows = run_case(label, case, device, args, peaks, args.backend)
        for r in rows:
            r["cpu_scaled_from"] = note
            r["load_avg"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""
        print_table(label, case, note, rows)
        if not args.no_csv:
            append_csv(args.csv, rows, meta)
        all_rows += rows
    if args.plot:
        for path in plot(all_rows, args.plot_dir, device.type):
            print(f"plot: {path}")
    if not args.no_csv:
        print(f"\n{len(all_rows)} rows appended to {args.csv}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
