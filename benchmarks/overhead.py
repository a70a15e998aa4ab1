"""Host overhead of patched layers in eager mode, where a CPU shows what a GPU pays per layer call.

On a GPU every aten op is at least one kernel launch and every microsecond of Python per layer call
is paid 560 times per SDXL UNet call; at diffusion shapes the LoRA FLOPs are ~2% of the base GEMM.
So this measures, in one run, with interleaved rounds (median, p20-p80):

1. one patched attention linear of the tiny SD1.5 pipeline (input 2 x 64 tokens): aten ops and host
   time per call for the bare base layer, PEFT with both adapters, and ``accelerate_fusion`` with each
   method (the static ones on merged weights, ``scratch`` and ``inplace``, and on the fused path,
   ``weights="off"``; kl on the fused path);
2. the steady-state denoiser call (``pipe.unet(latents, t, ...)``, batch 2 as with CFG, fixed t) of
   the tiny and the small SD1.5 pipelines: LoRA disabled vs PEFT vs each method (one pipeline copy
   per config, installed once), aten ops per call, and the median over many cycles (one call of
   each config) of each call's ratio to the LoRA-disabled call of its cycle (drifts of a shared CPU
   cancel), with the extra per LoRA layer, also as a share of PEFT's extra;
3. what a flip costs: one rebuild of a merged SDXL-sized weight next to one F.linear of that layer.

    python -m benchmarks.overhead [--rounds 15] [--csv benchmarks/results/overhead.csv | --no-csv]

Rows go to the CSV with date, commit, machine, threads and the share of CPU other processes used.
Targets (issue 11): static methods add at most 15% of PEFT's per-layer extra and stay within 1.02x
of the LoRA-disabled call; kl adds no more than PEFT's extra.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks.fusion_methods import count_ops
from benchmarks.run import RESULTS, append_rows, cpu_ticks, device_name, git_commit, other_cpu_share

METHODS = [  # (label, method, accelerate_fusion options)
    ("klora", "klora", {}),
    ("est", "est", {}),
    ("merge", "merge", {}),
    ("klora inplace", "klora", {"weights": "inplace"}),
    ("klora fused", "klora", {"weights": "off"}),
    ("kl", "kl", {}),
]
PIPELINES = {"tiny": 8, "small": 16}  # sd15_pipeline size -> latent side


def _pipeline(size: str):
    """An SD1.5-style pipeline with two random LoRAs ("subject" rank 4, "style" rank 16) on every
    attention projection, both active at weight 1."""
    from diffusers.utils import logging as dlog

    from lorafuse.integrations.tiny import lora_state_dict, sd15_pipeline

    dlog.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipeline(size)
        loras = {name: lora_state_dict(pipe.unet, "unet", rank, seed=seed, scale=scale)  # before any is loaded
                 for name, rank, seed, scale in (("subject", 4, 1, 0.10), ("style", 16, 2, 0.06))}
        for name, sd in loras.items():
            pipe.load_lora_weights(sd, adapter_name=name)
    pipe.set_adapters(["subject", "style"], [1.0, 1.0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _install(pipe, config: str):
    """Set the pipeline up as ``config`` ("disabled", "peft", or a METHODS label); returns an undo."""
    from lorafuse import accelerate_fusion

    if config.startswith("disabled"):
        pipe.unet.disable_lora()  # (disable_adapters() raises in diffusers 0.32 after load_lora_weights)
        return pipe.unet.enable_lora
    if config == "peft":
        return lambda: None
    _, method, options = next(m for m in METHODS if m[0] == config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = accelerate_fusion(pipe, "subject", "style", method=method, **options)
    return h.remove


def _per_call_us(fn, calls: int) -> float:
    """This thread's CPU time per call (a preemption by another process is not counted)."""
    fn()
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


def _interleaved(setups: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """{config: [us per call per round]}: every round installs and times each config in turn."""
    times = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (install, fn) in setups.items():
            undo = install()
            try:
                times[name].append(_per_call_us(fn, calls))
            finally:
                undo()
    return times


def _quantiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=5) if len(v) > 1 else [v[0]] * 4
    return statistics.median(v), q[0], q[3]


def layer_rows(pipe, rounds: int, calls: int) -> list[dict]:
    """Section 1: one patched to_q layer of the tiny pipeline."""
    m = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    x = torch.randn(2, 64, m.in_features)
    fake_step = torch.tensor(500)

    def install(config):
        def go():
            undo = _install(pipe, config)
            if config not in ("disabled", "peft"):  # as inside a denoiser call: the step's gates are set
                hook_step(pipe, fake_step)
            return undo
        return go

    configs = ["base", "peft"] + [label for label, _, _ in METHODS]
    setups = {c: ((lambda: (lambda: None)) if c == "base" else install(c), (lambda: m.base_layer(x)) if c == "base"
                  else (lambda: m(x))) for c in configs}
    rows = []
    with torch.no_grad():
        ops = {}
        for c in configs:
            undo = setups[c][0]()
            try:
                setups[c][1]()
                ops[c] = count_ops(setups[c][1])
            finally:
                undo()
        times = _interleaved(setups, rounds, calls)
    base = statistics.median(times["base"])
    peft_extra = statistics.median(times["peft"]) - base
    for c in configs:
        med, p20, p80 = _quantiles(times[c])
        rows.append(dict(section="layer", pipeline="tiny to_q 2x64", config=c, ops_per_call=ops[c], us=med, p20=p20,
                         p80=p80, ratio=med / base, extra_us=med - base,
                         extra_vs_peft=(med - base) / peft_extra if peft_extra > 0 else float("nan")))
    return rows


def hook_step(pipe, t) -> None:
    """Run the fusion pre-hook's bookkeeping for timestep ``t`` without a whole denoiser call."""
    unet = pipe.unet
    for hook in unet._forward_pre_hooks.values():
        hook(unet, (None, t), {})


def denoiser_rows(size: str, rounds: int, calls: int) -> list[dict]:
    """Section 2: steady-state denoiser calls of one pipeline, timed in cycles of one call per config.

    There is one copy of the pipeline per config (same seeds, same weights). Each round installs
    every config on a copy (config i on copy i + round: across rounds each config runs on every copy,
    so what one copy's memory layout costs is averaged out), warms each up with one call, runs
    ``calls`` cycles (each in a new random order) and removes the configs again. A config's ratio
    is the median over all cycles of its call's time over the LoRA-disabled call of the same cycle:
    the machine's drifts (this shared CPU's speed moves by +-30% within seconds) hit both calls of a
    pair alike. Times are this thread's CPU time (the host work a GPU would wait on; a preemption by
    another process is not counted). "disabled again" is a second LoRA-disabled config: its ratio is
    the noise floor of the method."""
    from lorafuse.integrations.discovery import _lora_layers

    configs = ["disabled", "disabled again", "peft"] + [label for label, _, _ in METHODS]
    copies = [_pipeline(size) for _ in configs]
    side = PIPELINES[size]
    unet0 = copies[0].unet
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet0.config.in_channels, side, side, generator=g)
    ehs = torch.randn(2, 77, unet0.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    n_lora = sum(1 for _ in _lora_layers(unet0, ("subject", "style")))
    times: dict[str, list[float]] = {c: [] for c in configs}
    ops: dict[str, int] = {}
    rng = random.Random(0)
    with torch.no_grad():
        for r in range(rounds):
            pipes = {c: copies[(i + r) % len(copies)] for i, c in enumerate(configs)}
            undos = []
            try:
                for c in configs:
                    undos.append(_install(pipes[c], c))
                calls_of = {c: (lambda u=pipes[c].unet: u(latents, t, encoder_hidden_states=ehs)) for c in configs}
                for c in configs:
                    calls_of[c]()  # warm-up (first-call preparation, packing, merging)
                    if c not in ops:
                        ops[c] = count_ops(calls_of[c])
                for _ in range(calls):
                    order = list(configs)
                    rng.shuffle(order)  # no config always follows the same one (its cache / allocator state)
                    for c in order:
                        fn = calls_of[c]
                        t0 = time.thread_time()
                        fn()
                        times[c].append((time.thread_time() - t0) * 1e6)
            finally:
                for undo in undos:
                    undo()

    def paired(c):  # per cycle, against the LoRA-disabled call of the same cycle
        return statistics.median(a / b for a, b in zip(times[c], times["disabled"]))

    off = statistics.median(times["disabled"])
    peft_extra = paired("peft") - 1
    rows = []
    for c in configs:
        med, p20, p80 = _quantiles(times[c])
        ratio = paired(c)
        rows.append(dict(section="denoiser", pipeline=f"sd15 {size} {side}x{side} batch 2 ({n_lora} LoRA layers)",
                         config=c, ops_per_call=ops[c], us=med, p20=p20, p80=p80, ratio=ratio,
                         extra_us=(ratio - 1) * off / n_lora,
                         extra_vs_peft=(ratio - 1) / peft_extra if peft_extra > 0 else float("nan")))
    return rows


def rebuild_rows(rounds: int) -> list[dict]:
    """Section 3: what one flip costs, the rebuild of one layer's merged weight (torch backend on a
    CPU), next to one F.linear of the layer at a typical token count."""
    import torch.nn.functional as F

    from lorafuse.kernels import PackedLoRA
    from lorafuse.kernels.merge_weight import merge_lora_weight

    rows = []
    g = torch.Generator().manual_seed(0)
    for name, M, K, N in (("sdxl 32px attn", 2048, 1280, 1280), ("sdxl 64px attn", 8192, 640, 640)):
        W, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
        packed = PackedLoRA.pack([(torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), 1.0)
                                  for r in (4, 16)], dtype=torch.float32)
        out, gates = torch.empty_like(W), torch.tensor([1.0, 0.0])
        merge = [_per_call_us(lambda: merge_lora_weight(W, packed, gates, out=out, backend="torch"), 5)
                 for _ in range(rounds)]
        linear = [_per_call_us(lambda: F.linear(x, W), 3) for _ in range(rounds)]
        for config, v in (("rebuild W_eff", merge), (f"F.linear M={M}", linear)):
            med, p20, p80 = _quantiles(v)
            rows.append(dict(section="flip", pipeline=f"{name} {N}x{K} fp32 ranks 4+16", config=config,
                             ops_per_call="", us=med, p20=p20, p80=p80, ratio=med / statistics.median(linear),
                             extra_us=float("nan"), extra_vs_peft=float("nan")))
    return rows


FIELDS = ["date", "commit", "machine", "threads", "other_cpu", "section", "pipeline", "config", "ops_per_call", "us",
          "p20", "p80", "ratio", "extra_us", "extra_vs_peft"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median over them)")
    parser.add_argument("--layer-calls", type=int, default=2000, help="layer calls timed per config and round")
    parser.add_argument("--denoiser-calls", type=int, default=10,
                        help="denoiser call cycles (one call per config) per round")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--csv", type=Path, default=RESULTS / "overhead.csv", help="append rows here")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ticks0, t0 = cpu_ticks(), time.perf_counter()
    machine = device_name(torch.device("cpu"))  # names the thread count the rows ran with
    try:
        rows = layer_rows(_pipeline("tiny"), args.rounds, args.layer_calls)
        for size in args.pipelines:
            rows += denoiser_rows(size, args.rounds, args.denoiser_calls)
        rows += rebuild_rows(args.rounds)
    finally:
        torch.set_num_threads(threads)
    other = other_cpu_share(ticks0, cpu_ticks(), time.perf_counter() - t0)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                machine=machine, threads=1, other_cpu=f"{other:.2f}")
    print(f"1 thread, {args.rounds} interleaved rounds, other processes used {other:.0%} of the CPU")
    print(f"{'section':9s} {'pipeline':38s} {'config':14s} {'ops':>5s} {'us/call':>9s} {'p20-p80':>17s} "
          f"{'x base':>7s} {'extra/layer':>11s} {'of PEFT':>8s}")
    for r in rows:
        print(f"{r['section']:9s} {r['pipeline']:38s} {r['config']:14s} {r['ops_per_call']!s:>5s} {r['us']:9.1f} "
              f"{r['p20']:8.1f}-{r['p80']:<8.1f} {r['ratio']:7.3f} {r['extra_us']:11.1f} {r['extra_vs_peft']:8.1%}")
    if not args.no_csv:
        append_rows(args.csv, FIELDS, ({**meta, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}}
                                       for r in rows))
        print(f"rows appended to {args.csv}")
    return 0


def layer_op_counts() -> dict[str, int]:
    """{"peft": n, "<method> log=<bool>": n}: aten ops of one call of the tiny pipeline's patched
    to_q layer, for PEFT and each method with gate logging on and off."""
    from lorafuse import accelerate_fusion

    pipe = _pipeline("tiny")
    m = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    x = torch.randn(2, 64, m.in_features)
    counts = {}
    with torch.no_grad():
        counts["peft"] = count_ops(lambda: m(x))
        for method in ("klora", "est", "merge", "kl"):
            for log in (True, False):
                h = accelerate_fusion(pipe, "subject", "style", method=method, log_gates=log)
                hook_step(pipe, torch.tensor(500))
                m(x)
                counts[f"{method} log={log}"] = count_ops(lambda: m(x))
                h.remove()
    return counts


if __name__ == "__main__":
    raise SystemExit(main())
