"""Steady-state denoiser call of the tiny SD1.5 pipeline (32 LoRA linears, batch 2 as with CFG, 8x8
latents, 1 thread): LoRA disabled vs PEFT with both adapters vs ``accelerate_fusion`` methods,
medians of interleaved rounds (each round times every provider once, in turn); and one patched
layer call (the first attn1.to_q, x (2, 64, 32)): bare base linear vs PEFT vs each method.

    nice -n 0 python -m benchmarks.denoiser_call [--rounds 15] [--calls 20] [--methods kl]

Prints ms per ``pipe.unet(...)`` call with the per-LoRA-layer extra over the LoRA-disabled call, and
us per layer call.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def tiny_sd15():
    """(pipe, unet call kwargs): the tiny SD1.5 pipeline with the demo's two LoRAs loaded."""
    from lorafuse.demo import _quiet_libraries, write_loras
    from lorafuse.integrations.tiny import sd15_pipeline

    _quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipeline("tiny")
        with tempfile.TemporaryDirectory() as tmp:
            subject, style = write_loras(pipe, Path(tmp))
            pipe.load_lora_weights(str(subject), adapter_name="subject")
            pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["subject", "style"], [1.0, 1.0])
    pipe.scheduler.set_timesteps(20)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt("a photo of sks dog", "cpu", 1, True)
    g = torch.Generator().manual_seed(0)
    kw = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=pipe.scheduler.timesteps[5],
              encoder_hidden_states=torch.cat([neg, pos]))
    return pipe, kw


def main(argv: list[str] | None = None) -> int:
    from lorafuse import accelerate_fusion

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["kl"])
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe, kw = tiny_sd15()
    unet = pipe.unet
    handles = {}
    layers = 0
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        with torch.no_grad():
            fn()  # warm
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times.setdefault(name, []).append((time.perf_counter() - t0) / args.calls * 1e3)

    layer = next(m for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    x = torch.randn(2, 64, layer.in_features)
    base_layer = layer.get_base_layer()
    layer_us: dict[str, list[float]] = {}

    def timed_layer(name, fn, n=500):
        with torch.no_grad():
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            layer_us.setdefault(name, []).append((time.perf_counter() - t0) / n * 1e6)

    try:
        for _ in range(args.rounds):
            timed_layer("base linear", lambda: base_layer(x))
            timed_layer("peft", lambda: layer(x))
            unet.disable_adapters()
            timed("lora disabled", lambda: unet(**kw))
            unet.enable_adapters()
            pipe.set_adapters(["subject", "style"], [1.0, 1.0])
            timed("peft", lambda: unet(**kw))
            for method in args.methods:
                h = handles.get(method) or accelerate_fusion(pipe, "subject", "style", method=method)
                handles[method] = h
                layers = h.num_layers
                timed(method, lambda: unet(**kw))
                h._started = True  # as inside a denoiser call
                timed_layer(method, lambda: layer(x))
                h.clear_gate_log()
                h.remove()
                handles.pop(method)
    finally:
        torch.set_num_threads(threads)
    base = statistics.median(times["lora disabled"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14s} {med:7.2f} ms per denoiser call (min {min(ts):6.2f}); "
              f"extra per LoRA layer {(med - base) / layers * 1e3:6.0f} us ({layers} layers)")
    for name, ts in layer_us.items():
        print(f"layer call {name:14s} {statistics.median(ts):7.1f} us (min {min(ts):6.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
