"""Throughput of concurrent requests through one installation (diffusers' server pattern).

One shared tiny SD1.5 pipeline per config (two random LoRAs on every attention projection): PEFT with
both adapters, or ``accelerate_fusion`` installed once (klora on merged weights, kl on the fused
path). A request is ``StableDiffusionPipeline.from_pipe(shared, scheduler=<a fresh DDIM>)`` called
with its own prompt, seed and steps (text encoder, denoiser loop with CFG, VAE decode), in a thread
of its own. For N = 1, 2, 4 requests started together, images/s = N / wall time of the round; every
round measures each (config, N) once, in a shuffled order (drifts of a shared CPU hit all configs),
and the table gives medians (p20-p80) and the ratio to PEFT's median at the same N.

lorafuse serialises the denoiser calls of one installation (its lock), PEFT does not; text encoders
and the VAE run concurrently under both.

    python -m benchmarks.serving [--rounds 7] [--steps 4] [--threads T]
                                 [--csv benchmarks/results/serving.csv | --no-csv]

Rows are appended to the CSV with date, commit, versions, machine, torch threads, the load average
before the run and the share of CPU other processes used during it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import random
import statistics
import threading
import time
import warnings
from pathlib import Path

import torch

from benchmarks.run import RESULTS, append_rows, cpu_ticks, device_name, git_commit, other_cpu_share

CONFIGS = ("peft", "klora", "kl")
CONCURRENCY = (1, 2, 4)
FIELDS = ["date", "commit", "versions", "machine", "threads", "loadavg", "other_cpu", "steps", "rounds", "config",
          "requests", "images_per_s", "p20", "p80", "vs_peft"]


def _shared(config: str):
    """The shared components of one config: the tiny SD1.5 pipeline with "subject" (rank 4) and
    "style" (rank 16) LoRAs, both active (PEFT) or fused by ``config``."""
    from diffusers.utils import logging as dlog

    from lorafuse import accelerate_fusion
    from lorafuse.integrations.tiny import lora_state_dict, sd15_pipeline

    dlog.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipeline()
        loras = {name: lora_state_dict(pipe.unet, "unet", rank, seed=seed, scale=scale)  # before any is loaded
                 for name, rank, seed, scale in (("subject", 4, 1, 0.10), ("style", 16, 2, 0.06))}
        for name, sd in loras.items():
            pipe.load_lora_weights(sd, adapter_name=name)
        pipe.set_adapters(["subject", "style"], [1.0, 1.0])
        if config != "peft":
            accelerate_fusion(pipe, "subject", "style", method=config)
    return pipe


def _request(shared, steps: int, seed: int) -> None:
    from diffusers import StableDiffusionPipeline

    scheduler = type(shared.scheduler).from_config(shared.scheduler.config)
    # a tokenizer per request: a fast tokenizer's padding / truncation state is not thread-safe (with
    # one shared, a request now and then fails or encodes another's prompt, PEFT alone too)
    pipe = StableDiffusionPipeline.from_pipe(shared, scheduler=scheduler, tokenizer=copy.deepcopy(shared.tokenizer))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(prompt=f"a photo of sks dog, variant {seed}", num_inference_steps=steps, guidance_scale=6.0, height=32,
             width=32, output_type="pt", generator=torch.Generator().manual_seed(seed))


def _round(shared, n: int, steps: int) -> float:
    """images/s of ``n`` requests started together, one thread each."""
    start = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def work(seed):
        start.wait()
        try:
            _request(shared, steps, seed)
        except BaseException as e:  # a failed request must fail the round, not make it look fast
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent requests failed") from errors[0]
    return n / elapsed


def _quantiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=5) if len(v) > 1 else [v[0]] * 4
    return statistics.median(v), q[0], q[3]


def _versions() -> str:
    import diffusers
    import peft

    import lorafuse

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, " \
           f"lorafuse {getattr(lorafuse, '__version__', '?')}"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "serving.csv")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    pipes = {c: _shared(c) for c in CONFIGS}
    for c in CONFIGS:  # warm up: first-call costs out of the rounds
        _round(pipes[c], 1, args.steps)
    times: dict[tuple[str, int], list[float]] = {(c, n): [] for c in CONFIGS for n in CONCURRENCY}
    order = list(times)
    rng = random.Random(0)
    ticks, t0 = cpu_ticks(), time.perf_counter()
    for _ in range(args.rounds):
        rng.shuffle(order)
        for c, n in order:
            times[c, n].append(_round(pipes[c], n, args.steps))
    other = other_cpu_share(ticks, cpu_ticks(), time.perf_counter() - t0)
    machine = device_name(torch.device("cpu"))
    date, commit, versions = datetime.datetime.now().isoformat(timespec="seconds"), git_commit(), _versions()
    rows = []
    print(f"{machine}, torch threads {torch.get_num_threads()}, load {load:.2f}, "
          f"other processes {other:.0%} of the CPU")
    print(f"{'config':8} {'N':>2} {'images/s':>9} {'p20':>8} {'p80':>8} {'vs peft':>8}")
    for c, n in times:
        med, p20, p80 = _quantiles(times[c, n])
        ratio = med / statistics.median(times["peft", n])
        print(f"{c:8} {n:>2} {med:9.2f} {p20:8.2f} {p80:8.2f} {ratio:8.3f}")
        rows.append(dict(date=date, commit=commit, versions=versions, machine=machine, threads=torch.get_num_threads(),
                         loadavg=f"{load:.2f}", other_cpu=f"{other:.2f}", steps=args.steps, rounds=args.rounds,
                         config=c, requests=n, images_per_s=f"{med:.3f}", p20=f"{p20:.3f}", p80=f"{p80:.3f}",
                         vs_peft=f"{ratio:.3f}"))
    if not args.no_csv:
        append_rows(args.csv, FIELDS, rows)
    return rows


if __name__ == "__main__":
    main()
