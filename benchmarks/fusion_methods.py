"""Fusion-method costs outside the GEMM, for the 560 attention linears of an SDXL UNet:

1. **prepare**: K-LoRA's static statistics (exact top-K of |dW| with K = r_c r_s, and the L1 norms of
   gamma) and EST's (Gram energies ||dW||_F^2 plus the L1 norms), for every layer, LoRA ranks 8 and
   64. Layers are processed one at a time (dW is formed in row chunks of one layer, never for all).
2. **gate update per step**: ``method.begin_step(Progress(tau))`` for all 560 layers (a fixed handful
   of tensor ops on the device, no host read), against the obvious alternative in the same run: a
   Python loop over the layers writing each layer's gates (560 iterations of small tensor ops).
   The number of aten ops each dispatches is counted (a TorchDispatchMode), so the claim "a few
   launches, independent of L" is measured, not asserted.

    python -m benchmarks.fusion_methods [--device cpu|cuda] [--ranks 8,64] [--layers 560] [--no-csv]

Rows are appended to ``results/fusion_methods.csv`` with device, versions, commit and date. CPU
timings are wall-clock medians (prepare: one timed pass after a warm-up on 8 layers; gate update:
interleaved rounds); GPU timings use CUDA synchronisation (prepare) and ``triton.testing.do_bench``
(gate update).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):  # `python benchmarks/fusion_methods.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import RESULTS, cpu_ticks, device_name, git_commit, other_cpu_share, sync, triton_version
from lorafuse.fusion import ESTLoRA, KLoRA, LayerLoRAs, Progress
from lorafuse.fusion.schedule import time_scale

CSV_FIELDS = ["date", "benchmark", "method", "ranks", "layers", "median_ms", "baseline", "baseline_ms",
              "speedup_vs_baseline", "aten_ops", "baseline_aten_ops", "other_cpu", "device", "torch", "triton",
              "git_commit"]


def sdxl_attention_shapes() -> list[tuple[str, int, int]]:
    """(module path, in_features, out_features) of the 560 attention linears of the SDXL UNet:
    70 transformer blocks (640 channels: 4 + 6, 1280: 20 + 10 + 30), each attn1 q/k/v/out (C -> C)
    and attn2 q/out (C -> C), k/v (2048 -> C, the text width)."""
    levels = [("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10), ("mid_block", 1280, 1, 10),
              ("up_blocks.0", 1280, 3, 10), ("up_blocks.1", 640, 3, 2)]
    shapes = []
    for prefix, C, attentions, depth in levels:
        for a in range(attentions):
            for t in range(depth):
                block = f"{prefix}.attentions.{a}.transformer_blocks.{t}"
                for attn in ("attn1", "attn2"):
                    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                        K = 2048 if attn == "attn2" and proj in ("to_k", "to_v") else C
                        shapes.append((f"{block}.{attn}.{proj}", K, C))
    assert len(shapes) == 560
    return shapes


def make_layers(shapes, ranks: tuple[int, int], device, seed: int = 0) -> list[LayerLoRAs]:
    g = torch.Generator().manual_seed(seed)

    def lora(K, N, r, scale):
        A = (torch.randn(r, K, generator=g) / K**0.5).to(device)
        B = (torch.randn(N, r, generator=g) / r**0.5).to(device)
        return A, B, scale

    return [LayerLoRAs(name, lora(K, N, ranks[0], 1.0), lora(K, N, ranks[1], 0.8)) for name, K, N in shapes]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the context (each is at least one kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.ops


def per_layer_loop(method) -> callable:
    """The baseline gate update: one Python iteration (and a few tensor ops) per layer, with the same
    fp64 scores and the same rule as the method (subject iff score_c / gamma > score_s S(tau))."""
    num, den, gates = method._num, method._den, method._gates

    def update(tau):
        S = time_scale(tau, method.pattern, method.alpha, method.beta)
        for layer in range(len(gates)):
            subject = num[layer] > den[layer] * S
            gates[layer, 0] = subject
            gates[layer, 1] = ~subject

    return update


def time_prepare(factory, layers, device) -> float:
    factory().prepare(layers[:8], device)  # warm-up: allocator, Triton JIT/autotune on GPU
    sync(device)
    t0 = time.perf_counter()
    factory().prepare(layers, device)
    sync(device)
    return time.perf_counter() - t0


def time_calls(fns: dict, device, rounds: int) -> dict:
    """{name: median ms}. GPU: do_bench per function; CPU: interleaved rounds of ``inner`` calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: do_bench(fn, warmup=25, rep=200) for name, fn in fns.items()}
    inner = {}
    for name, fn in fns.items():  # size the inner loop to ~5 ms per sample
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(5e-3 / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fns[name]()
            samples[name].append((time.perf_counter() - t0) / inner[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def run(device: torch.device, ranks_list, num_layers: int, rounds: int) -> list[dict]:
    shapes = sdxl_attention_shapes()[:num_layers]
    backend = "triton" if device.type == "cuda" else "torch"
    rows = []
    for rank in ranks_list:
        layers = make_layers(shapes, (rank, rank), device)
        for name, factory in (("klora", lambda: KLoRA(stats_backend=backend)),
                              ("est", lambda: ESTLoRA(stats_backend=backend))):
            before, t0 = cpu_ticks(), time.perf_counter()
            seconds = time_prepare(factory, layers, device)
            other = other_cpu_share(before, cpu_ticks(), time.perf_counter() - t0)
            rows.append({"benchmark": "prepare", "method": name, "ranks": f"{rank},{rank}", "layers": len(layers),
                         "median_ms": seconds * 1e3, "other_cpu": other})
            print(f"prepare   {name:5s} ranks {rank:3d}/{rank:<3d} {len(layers)} layers: {seconds * 1e3:10.1f} ms "
                  f"({seconds * 1e3 / len(layers):.2f} ms/layer, other CPU {other:.0%})")
        del layers

    layers = make_layers(shapes, (8, 8), device)
    for name, method in (("klora", KLoRA(stats_backend=backend)), ("est", ESTLoRA(stats_backend=backend))):
        method.prepare(layers, device)
        tau = torch.zeros((), dtype=torch.float64, device=device)
        loop = per_layer_loop(method)
        fused = lambda: method.begin_step(Progress(tau=tau))  # noqa: E731
        baseline = lambda: loop(tau)  # noqa: E731
        fused()
        expected = method._gates.clone()
        baseline()
        assert torch.equal(method._gates, expected), "the per-layer loop computes other gates"
        ops, base_ops = count_ops(fused), count_ops(baseline)
        before, t0 = cpu_ticks(), time.perf_counter()
        ms = time_calls({"fused": fused, "loop": baseline}, device, rounds)
        other = other_cpu_share(before, cpu_ticks(), time.perf_counter() - t0)
        rows.append({"benchmark": "gate_update", "method": name, "ranks": "8,8", "layers": len(layers),
                     "median_ms": ms["fused"], "baseline": "python loop over layers", "baseline_ms": ms["loop"],
                     "speedup_vs_baseline": ms["loop"] / ms["fused"], "aten_ops": ops, "baseline_aten_ops": base_ops,
                     "other_cpu": other})
        print(f"gate step {name:5s} {len(layers)} layers: begin_step {ms['fused'] * 1e3:8.1f} us ({ops} aten ops) vs "
              f"per-layer loop {ms['loop'] * 1e3:9.1f} us ({base_ops} aten ops): {ms['loop'] / ms['fused']:.0f}x")
    return rows


def append_csv(path: Path, rows: list[dict], device: torch.device) -> None:
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
            "git_commit": git_commit()}
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in {**meta, **row}.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fusion_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--ranks", default="8,64", help="comma-separated LoRA ranks for the prepare pass (default 8,64)")
    p.add_argument("--layers", type=int, default=560, help="first N of the 560 SDXL attention linears")
    p.add_argument("--rounds", type=int, default=15, help="CPU: interleaved timing rounds of the gate update")
    p.add_argument("--csv", type=Path, default=RESULTS / "fusion_methods.csv")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU")
    if not 1 <= args.layers <= 560:
        p.error("--layers must be in 1..560")
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"fusion-method costs on {device_name(device)}, torch {torch.__version__}")
    rows = run(device, ranks, args.layers, args.rounds)
    if not args.no_csv:
        append_csv(args.csv, rows, device)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
