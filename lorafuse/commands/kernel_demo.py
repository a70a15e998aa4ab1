"""`lorafuse kernel`: the fused kernel on one random attention-sized layer with a subject and a style
LoRA. Prints, per backend, the error against an fp64 reference and the time per call, next to
F.linear alone and a PEFT-style unfused forward (one base GEMM plus two matmuls per adapter).

On a CUDA machine the Triton kernels run natively; on a CPU the torch backend runs, and the Triton
kernels run too when ``TRITON_INTERPRET=1`` is set (through the interpreter: correct but slow, so the
layer is smaller there).
"""

from __future__ import annotations

import argparse
import statistics
import time

from ._common import add_command, resolve_device

SUMMARY = "the fused kernel on one random layer: error vs fp64 and time per backend"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(subparsers, "kernel", SUMMARY, __doc__, main)
    p.add_argument("--tiny", action="store_true", help="smallest shapes (CI)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def _time(fn, device, rounds: int) -> float:
    """Median seconds per call over ``rounds`` timed calls after one warm-up call."""
    import torch

    fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    import torch
    import torch.nn.functional as F

    from ..kernels import PackedLoRA, fused_lora_linear
    from ..kernels._common import HAS_TRITON, interpreter_active

    tiny = args.tiny
    interp = device.type == "cpu" and HAS_TRITON and interpreter_active()
    if device.type == "cuda":
        M, K, N, dtype, rounds = 8192, 640, 640, torch.float16, 50
    elif interp or tiny:
        M, K, N, dtype, rounds = 154, 320, 320, torch.float32, 3
    else:
        M, K, N, dtype, rounds = 2048, 640, 640, torch.float32, 10
    r_sub, r_sty = 8, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) * 0.1
    subject = (torch.randn(r_sub, K, generator=g) / K**0.5, torch.randn(N, r_sub, generator=g) / r_sub**0.5, 1.0)
    style = (torch.randn(r_sty, K, generator=g) / K**0.5, torch.randn(N, r_sty, generator=g) / r_sty**0.5, 0.8)
    gates = torch.tensor([1.0, 0.0])  # K-LoRA-style: the subject LoRA acts in this layer at this step

    # fp64 reference of y = x W^T + b + g_c s_c (x A_c^T) B_c^T + g_s s_s (x A_s^T) B_s^T
    ref = F.linear(x.double(), W.double(), b.double())
    for gate, (A, B, s) in zip(gates.tolist(), (subject, style)):
        ref += gate * s * (x.double() @ A.double().t()) @ B.double().t()

    x, W, b, gates = (t.to(device, dtype) for t in (x, W, b, gates))
    loras = [(A.to(device, dtype), B.to(device, dtype), s) for A, B, s in (subject, style)]
    packed = PackedLoRA.pack(loras)

    def peft_style():  # what PEFT's eager forward does for two active adapters
        y = F.linear(x, W, b)
        for gate, (A, B, s) in zip((1.0, 0.0), loras):
            y = y + (x @ A.t()) @ B.t() * (s * gate)
        return y

    rows = [("F.linear alone (no LoRA)", lambda: F.linear(x, W, b), False), ("PEFT-style unfused", peft_style, True)]
    rows.append(("lorafuse torch backend", lambda: fused_lora_linear(x, W, b, packed, gates, backend="torch"), True))
    if HAS_TRITON and (device.type == "cuda" or interp):
        label = "lorafuse triton" + (" (interpreter)" if interp else "")
        rows.append((label, lambda: fused_lora_linear(x, W, b, packed, gates, backend="triton"), True))
        rows.append((label + " + stats", lambda: fused_lora_linear(x, W, b, packed, gates, stats=True, backend="triton")[0], True))

    print(f"lorafuse kernel: one linear, x ({M} x {K}) -> {N}, subject rank {r_sub}, style rank {r_sty}, "
          f"{str(dtype).replace('torch.', '')} on {device.type}{' (Triton interpreter)' if interp else ''}")
    print(f"{'path':38s} {'time / call':>12s} {'vs F.linear':>12s} {'max |err| vs fp64':>18s}")
    base_time = None
    for name, fn, check in rows:
        t = _time(fn, device, 1 if "interpreter" in name else rounds)
        base_time = base_time or t
        err = (fn().double().cpu() - ref).abs().max().item() if check else float("nan")
        err_s = f"{err:18.2e}" if check else f"{'(no LoRA)':>18s}"
        print(f"{name:38s} {t * 1e3:9.3f} ms {t / base_time:11.2f}x {err_s}")
    if not (HAS_TRITON and (device.type == "cuda" or interp)):
        print("Triton kernels: need a CUDA GPU, or set TRITON_INTERPRET=1 to run them through the interpreter.")
    return 0
