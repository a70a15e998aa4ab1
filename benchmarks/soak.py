"""Soak: what an installation holds over many generations, and over many install / generate /
remove cycles (issue 21): host RSS after ``gc.collect()``, the live torch tensors of the process and
the gate log's size, sampled every few generations, with their growth (second half minus first half
of the samples, and the least-squares slope per 100 generations or cycles). RSS is also given after
glibc's ``malloc_trim``: heap pages the allocator keeps after they were freed (fragmentation, e.g.
over kl install cycles) count in the first, not in the second.

    python -m benchmarks.soak --generations 3000 --cycles 1000 [--method kl] [--log-gates all]

The pipeline is the tiny SD1.5 (``lorafuse.integrations.tiny``) with a subject and a style LoRA,
1 step at 16 x 16, one torch thread. ``tests/integrations/test_soak.py`` runs it short (300
generations, 100 cycles) and fails on growth.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import time

import torch

from lorafuse.integrations import accelerate_fusion
from lorafuse.integrations.tiny import lora_state_dict, sd15_pipeline


def rss_mib() -> float:
    """Resident set size of this process, MiB (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def trimmed_rss_mib() -> float | None:
    """RSS after glibc's ``malloc_trim(0)`` returned the freed heap pages it keeps (None off glibc):
    what the process still uses, without the allocator's retained free memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.malloc_trim(0)
    return rss_mib()


def live_tensors() -> int:
    """torch.Tensor objects the garbage collector tracks (parameters and buffers included)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def sample(done: int, h=None) -> dict:
    """One row after ``gc.collect()``: ``done`` (generations or cycles so far), RSS (then RSS after
    ``malloc_trim``), live tensors, the gate log's entries and held denoiser calls (reading it
    converts what it holds)."""
    log = h.gate_log if h is not None else []
    calls = h.summary()["gate_log"]["calls"] if h is not None else 0
    gc.collect()
    rss = rss_mib()
    return {"done": done, "rss_mib": rss, "rss_trimmed_mib": trimmed_rss_mib() or rss, "tensors": live_tensors(),
            "log_entries": len(log), "log_calls": calls}


def tiny_pipeline():
    """The tiny SD1.5 with "sbj" (rank 4) and "sty" (rank 8) on the attention linears."""
    pipe = sd15_pipeline()
    sbj = lora_state_dict(pipe.unet, "unet", 4, seed=1)
    sty = lora_state_dict(pipe.unet, "unet", 8, seed=2, scale=0.12)
    pipe.load_lora_weights(sbj, adapter_name="sbj")
    pipe.load_lora_weights(sty, adapter_name="sty")
    return pipe


def generate(pipe, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=1, height=16, width=16,
                    guidance_scale=6.0, output_type="latent").images


def soak_generations(pipe, n: int, every: int = 10, method: str = "klora", log_gates=True) -> list[dict]:
    """``n`` generations on one installation; a sample every ``every`` (after one warm-up)."""
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", log_gates=log_gates, progress=False)
    try:
        generate(pipe, embeds)
        rows = [sample(0, h)]
        for i in range(1, n + 1):
            generate(pipe, embeds)
            if i % every == 0:
                rows.append(sample(i, h))
        return rows
    finally:
        h.remove()


def soak_cycles(pipe, n: int, every: int = 5, method: str = "klora") -> list[dict]:
    """``n`` cycles of install, one generation, remove; a sample every ``every`` (after one warm-up)."""
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))

    def cycle():
        h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", progress=False)
        generate(pipe, embeds)
        h.remove()

    cycle()
    rows = [sample(0)]
    for i in range(1, n + 1):
        cycle()
        if i % every == 0:
            rows.append(sample(i))
    return rows


def growth(rows: list[dict], key: str) -> dict:
    """``half``: mean of the second half of the samples minus the first half's; ``per_100``: the
    least-squares slope per 100 generations / cycles; ``first`` / ``last``: the end values."""
    xs = [r["done"] for r in rows]
    ys = [float(r[key]) for r in rows]
    h = len(ys) // 2
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return {"first": ys[0], "last": ys[-1], "half": sum(ys[len(ys) - h:]) / h - sum(ys[:h]) / h, "per_100": 100 * slope}


KEYS = ("rss_mib", "rss_trimmed_mib", "tensors", "log_entries", "log_calls")


def report(name: str, rows: list[dict], seconds: float) -> dict:
    """Print one line per quantity and return {key: growth}."""
    out = {k: growth(rows, k) for k in KEYS}
    print(f"{name}: {rows[-1]['done']} in {seconds:.1f} s")
    for k, g in out.items():
        print(f"  {k:15s} first {g['first']:10.2f}  last {g['last']:10.2f}  second half - first half {g['half']:+9.3f}"
              f"  slope per 100 {g['per_100']:+9.3f}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=3000)
    p.add_argument("--cycles", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="generations between samples (cycles: a fifth)")
    p.add_argument("--method", default="klora")
    p.add_argument("--log-gates", default="True", help='True, False, "all" or a number of denoiser calls')
    args = p.parse_args(argv)
    log_gates = {"True": True, "False": False}.get(args.log_gates, args.log_gates)
    if isinstance(log_gates, str) and log_gates.isdigit():
        log_gates = int(log_gates)
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    t = time.perf_counter()
    rows = soak_generations(pipe, args.generations, args.every, args.method, log_gates)
    report(f"generations on one installation ({args.method}, log_gates={log_gates!r})", rows, time.perf_counter() - t)
    t = time.perf_counter()
    rows = soak_cycles(pipe, args.cycles, max(1, args.every // 5), args.method)
    report(f"install / generate / remove cycles ({args.method})", rows, time.perf_counter() - t)


if __name__ == "__main__":
    main()
