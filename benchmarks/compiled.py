"""torch.compile'd sampling with each fusion method against the compiled pipeline with LoRA disabled
(issue 22, "torch.compile at merge speed").

The tiny FLUX and SDXL pipelines (``lorafuse.integrations.tiny``, random weights) with two PEFT LoRAs,
"sbj" (rank 4) and "sty" (rank 8), on the attention linears (FLUX: and the MLP linears), one torch
thread, images of ``--steps`` steps returned as latents. Configurations:

- ``bare``: LoRA disabled (``denoiser.disable_lora()``, overhead.py's baseline); every ratio is to it;
- ``peft``: both adapters active, PEFT's own forward;
- ``klora``, ``est``, ``merge``, ``kl``: ``accelerate_fusion(pipe, "sbj", "sty", method, backend="torch")``;

each compiled the ``regional`` (diffusers' ``compile_repeated_blocks``) or ``whole``
(``pipe.transformer = torch.compile(pipe.transformer)``) way (:mod:`benchmarks.compiling`) with the
``inductor`` or ``aot_eager`` backend, lorafuse installed ``after`` compiling (default) or ``before``.

Method, per (family, mode, backend, order) group: every configuration runs in a process of its own
(spawned, prepared one after the other: dynamo's caches and counters, and the compile times, are the
configuration's own, as in a real process). It makes the configuration's eager ``--steps`` image, then
builds a fresh pipeline (same seeds: identical weights), compiles and installs it, makes a 1-step image
(the first compile), 3- and 5-step images (a recompile for another step count would show) and one
``--steps`` image, compared with the eager one (max |diff| of the latents). Then the parent times all
configurations in ``--rounds`` interleaved rounds (round r starts at configuration r, round robin),
one image each, in the worker's thread CPU time (a preemption by another process is not counted); a
configuration's ratio is the median over rounds of its time over bare's time in the same round.

Dynamo's counters (``torch._dynamo.utils.counters``, cleared before the compile):
- ``graph_breaks``: the sum of ``counters["graph_break"]`` (one per break dynamo traced, keyed by its
  reason; the reasons are printed per configuration), from installation to the last timed image;
- ``recompiles``: frames dynamo compiled (``counters["frames"]["ok"]``) after the 1-step image, i.e.
  during the 3/5/N-step warm-up images and the timed rounds; ``recompiles_timed``: those during the
  timed rounds alone (non-zero means the steady state recompiles).

    python -m benchmarks.compiled [--families flux sdxl] [--modes regional whole] [--backends aot_eager inductor]
        [--orders after before] [--methods peft klora est merge kl] [--rounds 11] [--steps 4]
        [--out benchmarks/results/compiled.csv | --no-csv] [--quick]

Defaults: both families, ``regional`` only (a whole-model inductor compile of the tiny SDXL UNet took
~3 min per configuration on this 2-core CPU), both backends, ``after``, all six configurations, 11
rounds of 4-step images: ~15-20 min here.

Rows are appended to the CSV with device, versions, commit, date and the CPU share other processes
used; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.compiling import MODES, compile_denoiser
from benchmarks.run import RESULTS, append_rows, cpu_ticks, device_name, git_commit, other_cpu_share, triton_version

FAMILIES = ("flux", "sdxl")
BACKENDS = ("aot_eager", "inductor")
ORDERS = ("after", "before")
METHODS = ("klora", "est", "merge", "kl")
CONFIGS = ("bare", "peft") + METHODS
WARM_STEPS = (1, 3, 5)  # the 1-step image is the first compile; later compiles count as recompiles
FIELDS = ["family", "mode", "backend", "order", "config", "steps", "rounds", "status", "ms_median", "ratio_vs_bare",
          "graph_breaks", "recompiles", "recompiles_timed", "compile_s", "max_abs_diff_vs_eager", "other_cpu",
          "torch", "triton", "diffusers", "peft", "device", "git_commit", "date"]
QUICK = dict(families=["flux"], modes=["regional"], backends=["aot_eager"], orders=["after"],
             methods=["peft", "klora"], rounds=1, steps=2)


def build(family: str):
    """The tiny ``family`` pipeline with "sbj" (rank 4, seed 1) and "sty" (rank 8, seed 2), both active."""
    from diffusers.utils import logging as dlog

    from lorafuse.integrations.tiny import (ATTN_TARGETS, FLUX_TARGETS, denoiser, flux_pipeline, lora_state_dict,
                                            sdxl_pipeline)

    dlog.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = flux_pipeline() if family == "flux" else sdxl_pipeline()
        model, prefix = denoiser(pipe), "transformer" if family == "flux" else "unet"
        targets = FLUX_TARGETS if family == "flux" else ATTN_TARGETS
        loras = {"sbj": lora_state_dict(model, prefix, 4, seed=1, targets=targets),  # both before any is loaded
                 "sty": lora_state_dict(model, prefix, 8, seed=2, targets=targets, scale=0.12)}
        for name, sd in loras.items():
            pipe.load_lora_weights(sd, adapter_name=name)
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    return pipe


def call_kwargs(family: str, steps: int) -> dict:
    """One deterministic image of ``steps`` steps, returned as latents (as tests/integrations/tiny.py)."""
    g = torch.Generator().manual_seed(0)
    if family == "sdxl":
        return dict(prompt="a photo of sks dog", num_inference_steps=steps, guidance_scale=6.0, height=32, width=32,
                    output_type="latent", generator=g)
    e = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 7, 32, generator=e), pooled_prompt_embeds=torch.randn(1, 32, generator=e),
                num_inference_steps=steps, height=16, width=16, output_type="latent", generator=g)


def image(pipe, family: str, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**call_kwargs(family, steps)).images


def install(pipe, config: str) -> None:
    """Set the pipeline up as ``config`` (its denoiser may already be compiled)."""
    from lorafuse import accelerate_fusion
    from lorafuse.integrations.tiny import denoiser

    if config == "bare":
        model = denoiser(pipe)
        getattr(model, "_orig_mod", model).disable_lora()  # through a whole-model compile's wrapper
    elif config != "peft":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerate_fusion(pipe, "sbj", "sty", config, backend="torch", progress=False)


def compile_pipe(pipe, mode: str, backend: str):
    """Compile the pipeline's denoiser (:func:`benchmarks.compiling.compile_denoiser`) and put the
    module to call back into the pipeline (a worker process compiles one pipeline: nothing to undo)."""
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    compiled, _ = compile_denoiser(getattr(pipe, attr), mode, backend)
    setattr(pipe, attr, compiled)


def dynamo_counts() -> tuple[int, int]:
    """(frames dynamo compiled, graph breaks traced) so far."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"], sum(counters["graph_break"].values())


def break_reasons() -> collections.Counter:
    """{first line of a graph-break reason: times traced} so far."""
    from torch._dynamo.utils import counters

    return collections.Counter({k.strip().splitlines()[0][:160]: v for k, v in counters["graph_break"].items()})


@dataclass
class Setup:
    """One configuration in its worker process: its compiled pipeline and what its calls counted."""
    family: str
    config: str
    steps: int
    pipe: object = None
    compile_s: float = 0.0
    graph_breaks: int = 0
    recompiles: int = 0
    max_abs_diff: float = float("nan")
    reasons: collections.Counter = field(default_factory=collections.Counter)

    def counted(self, fn):
        """Run ``fn``; returns (its result, frames it compiled); adds its graph breaks to this setup."""
        frames0, breaks0 = dynamo_counts()
        before = break_reasons()
        out = fn()
        frames1, breaks1 = dynamo_counts()
        self.graph_breaks += breaks1 - breaks0
        self.reasons += break_reasons() - before
        return out, frames1 - frames0

    def prepare(self, mode: str, backend: str, order: str) -> None:
        """Eager image first; then a fresh pipeline set up as ``config`` and compiled, the 1-step image
        (the first compile), the warm-up images and the compiled ``steps`` image (vs the eager one)."""
        from torch._dynamo.utils import counters

        eager = eager_image(self.family, self.config, self.steps)
        self.pipe = build(self.family)
        counters.clear()
        t0 = time.perf_counter()
        if order == "before":
            install(self.pipe, self.config)
        compile_pipe(self.pipe, mode, backend)
        if order == "after":
            install(self.pipe, self.config)
        image(self.pipe, self.family, WARM_STEPS[0])
        self.compile_s = time.perf_counter() - t0
        self.graph_breaks, self.reasons = dynamo_counts()[1], break_reasons()
        for n in WARM_STEPS[1:]:
            self.recompiles += self.counted(lambda: image(self.pipe, self.family, n))[1]
        got, frames = self.counted(lambda: image(self.pipe, self.family, self.steps))
        self.recompiles += frames
        self.max_abs_diff = float((got - eager).abs().max())

    def timed(self) -> tuple[float, int]:
        """One ``steps`` image: (ms of this thread's CPU time, frames compiled)."""
        t0 = time.thread_time()
        _, frames = self.counted(lambda: image(self.pipe, self.family, self.steps))
        return (time.thread_time() - t0) * 1e3, frames


def eager_image(family: str, config: str, steps: int) -> torch.Tensor:
    """The ``steps``-step image of ``config`` on a fresh, uncompiled pipeline."""
    pipe = build(family)
    install(pipe, config)
    return image(pipe, family, steps)


def serve(conn, family: str, config: str, steps: int, mode: str, backend: str, order: str) -> None:
    """A worker process: prepare one configuration, report, then time one image per request."""
    torch.set_num_threads(1)
    setup = Setup(family, config, steps)
    try:
        setup.prepare(mode, backend, order)
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the group's other configurations still run
        conn.send(dict(status=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
        return
    conn.send(dict(status="ok", compile_s=setup.compile_s, graph_breaks=setup.graph_breaks,
                   recompiles=setup.recompiles, max_abs_diff=setup.max_abs_diff))
    while conn.recv() == "image":
        conn.send(setup.timed())
    conn.send(dict(graph_breaks=setup.graph_breaks, reasons=dict(setup.reasons)))


class Worker:
    """The parent's end of one configuration's process (its own dynamo caches and counters: a
    configuration's compiles, graph breaks and recompiles are its own, as in a real process)."""

    def __init__(self, ctx, config: str, *args):
        self.config = config
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, args[0], config, *args[1:]), daemon=True)
        self.process.start()
        try:
            self.ready = self.conn.recv()  # prepared one at a time: compile times do not overlap
        except EOFError:  # the process died (a crash in a compiler, out of memory)
            self.process.join()
            self.ready = dict(status=f"failed: the worker process exited with code {self.process.exitcode}")
        self.ms: list[float] = []
        self.recompiles_timed = 0

    @property
    def ok(self) -> bool:
        return self.ready["status"] == "ok"

    def time_one(self) -> None:
        self.conn.send("image")
        ms, frames = self.conn.recv()
        self.ms.append(ms)
        self.recompiles_timed += frames

    def close(self) -> dict:
        """Stop the worker; returns its final graph-break counts ({} if it failed)."""
        final = {}
        if self.ok:
            self.conn.send("stop")
            final = self.conn.recv()
        self.process.join(timeout=30)
        return final


def group_rows(family: str, mode: str, backend: str, order: str, configs: list[str], steps: int,
               rounds: int) -> list[dict]:
    """Prepare (one process each, one after the other) and time every configuration of one group in
    interleaved rounds (round r starts at configuration r); one row per configuration."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = []
    for config in configs:
        workers.append(Worker(ctx, config, family, steps, mode, backend, order))
        print(f"  {family} {mode} {backend} {order} {config}: {workers[-1].ready['status']}, "
              f"{workers[-1].ready.get('compile_s', float('nan')):.1f} s to the first image", flush=True)
    live = [w for w in workers if w.ok]
    for r in range(rounds):
        for w in live[r % len(live):] + live[:r % len(live)]:
            w.time_one()
    bare = workers[0]
    rows = []
    for w in workers:
        final, ready = w.close(), w.ready
        ratios = [a / b for a, b in zip(w.ms, bare.ms)] if w.ok and bare.ok else [float("nan")]
        rows.append(dict(family=family, mode=mode, backend=backend, order=order, config=w.config, steps=steps,
                         rounds=rounds, status=ready["status"],
                         ms_median=f"{statistics.median(w.ms or [float('nan')]):.3f}",
                         ratio_vs_bare=f"{statistics.median(ratios):.3f}", graph_breaks=final.get("graph_breaks", ""),
                         recompiles=ready.get("recompiles", 0) + w.recompiles_timed if w.ok else "",
                         recompiles_timed=w.recompiles_timed if w.ok else "",
                         compile_s=f"{ready.get('compile_s', float('nan')):.1f}",
                         max_abs_diff_vs_eager=f"{ready.get('max_abs_diff', float('nan')):.3g}"))
        for reason, n in sorted(final.get("reasons", {}).items(), key=lambda kv: -kv[1]):
            print(f"    graph breaks of {w.config}: {n} x {reason}")
    return rows


def versions() -> dict:
    import diffusers
    import peft

    return dict(torch=torch.__version__, triton=triton_version(), diffusers=diffusers.__version__,
                peft=peft.__version__)


def markdown(rows: list[dict]) -> str:
    head = ["family", "mode", "backend", "order", "config", "ms", "x bare", "graph breaks", "recompiles (timed)",
            "compile s", "max diff vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = r["ms_median"] if r["status"] == "ok" else r["status"]
        cells = [r["family"], r["mode"], r["backend"], r["order"], r["config"], ms, r["ratio_vs_bare"],
                 r["graph_breaks"], f"{r['recompiles']} ({r['recompiles_timed']})", r["compile_s"],
                 r["max_abs_diff_vs_eager"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--modes", nargs="+", default=["regional"], choices=MODES,
                    help="default regional only: a whole-model inductor compile of the tiny SDXL UNet takes ~3 min "
                         "per configuration on this CPU")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--orders", nargs="+", default=["after"], choices=ORDERS,
                    help="lorafuse installed after (default) or before compiling")
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS[1:]), choices=CONFIGS[1:],
                    help="configurations timed next to bare (always run)")
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median of the per-round ratios)")
    ap.add_argument("--steps", type=int, default=4, help="steps of a timed image")
    ap.add_argument("--out", type=Path, default=RESULTS / "compiled.csv", help="append rows here")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: flux, regional, aot_eager, after, bare + peft + klora, 1 round, 2 steps")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configs = ["bare"] + [c for c in CONFIGS[1:] if c in args.methods]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ticks0, t0 = cpu_ticks(), time.perf_counter()
    rows = []
    try:
        for family in args.families:
            for mode in args.modes:
                for backend in args.backends:
                    for order in args.orders:
                        rows += group_rows(family, mode, backend, order, configs, args.steps, args.rounds)
        device = device_name(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    other = other_cpu_share(ticks0, cpu_ticks(), time.perf_counter() - t0)
    meta = dict(other_cpu=f"{other:.2f}", **versions(), device=device, git_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = [dict(r, **meta) for r in rows]
    print(f"\n{device}, {args.rounds} interleaved rounds of {args.steps}-step images, {time.perf_counter() - t0:.0f} s, "
          f"other processes used {other:.0%} of the CPU\n")
    print(markdown(rows))
    if not args.no_csv:
        append_rows(args.out, FIELDS, rows)
        print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
