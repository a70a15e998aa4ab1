"""The GPU check in one command: everything a lent CUDA GPU should prove, in at most 8 minutes on an
H100/H200, written into one folder.

    python -m benchmarks.gpu_check --fetch-wheels .whl                      # here: the wheels it lacks
    python -m benchmarks.gpu_check --wheels .whl --out /tmp/gpu --bundle $OUT   # there, one call
    python -m benchmarks.gpu_check --out DIR [--dry-run] [--time-limit 450] [--parts pytest,fuzz,...]

The lent machines have no diffusers and no network: ``--fetch-wheels DIR`` downloads the pinned wheels
they lack (:mod:`benchmarks.wheels`), ``--wheels DIR`` unpacks them into a temporary folder put first on
``sys.path`` and ``PYTHONPATH`` before anything imports diffusers, ``--bundle DIR`` packs the output into
``DIR/gpu_check.tar.gz`` + ``DIR/summary.md`` (a lent machine returns at most 8 files).

Parts, run in this order, each in its own process with its own time limit (a crash, a CUDA error that
poisons the context, or a hang is recorded for that part and the next part still runs):

- ``pytest``  the GPU-only tests (``-m gpu``: bf16, CUDA graphs, torch.compile, opcheck, gradients) on
              the real kernels, no interpreter; log in ``pytest.log``.
- ``fuzz``    every registered kernel (:data:`FUZZ`) against its torch reference at the DESIGN.md
              shapes and every rank class, fp16 and bf16: ``fuzz.csv`` and ``fuzz.png``.
- ``layer``   the per-layer benchmark sweep of :mod:`benchmarks.run` at the DESIGN.md shapes (fp16,
              rank 16): ``layer.csv`` and ``plots/``.
- ``e2e_sdxl``, ``e2e_flux``  one denoiser step of the full-size SDXL UNet (fp16, batch 2, 128x128
              latents) and FLUX transformer (bf16, 1024^2: 4096 image + 512 text tokens), random
              weights, two rank-16 LoRAs on the attention (and FLUX MLP) linears, the rows of
              :data:`E2E_ROWS`: bare (LoRA disabled), PEFT with both adapters, the official K-LoRA layer
              (:mod:`benchmarks.klora_official`), ``accelerate_fusion`` with klora / est / merge in each
              weights mode and kl, eager, then some with the repeated blocks ``torch.compile``d
              (diffusers' regional compilation). Per row: the median step (ratio to bare from the same
              run), peak GPU memory (``max_memory_allocated``, reset per row), installation + first call;
              for each method's default mode also with a cold and a warm Triton cache and the kernel
              specialisations the cold start compiled (:mod:`benchmarks.triton_cache`): ``e2e.csv``,
              ``e2e.png``.

``summary.md`` gathers the device, driver, torch / triton / CUDA versions, git commit, date, each part's
status and time, and the tables. ``--dry-run`` runs every part on the CPU with tiny shapes (the tiny
pipelines of :mod:`lorafuse.integrations.tiny`, Triton through the interpreter, one torch thread),
in-process, in under a minute: CI runs it (``tests/test_gpu_check.py``). Results of a real run are
committed under ``benchmarks/results/gpu/<date>_<device>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# seconds per part on a GPU (the total stays under 8 minutes with process start-up); dry run: a cap only
PART_BUDGET = {"pytest": 55, "fuzz": 35, "layer": 50, "e2e_sdxl": 140, "e2e_flux": 160}
DRY_BUDGET = {"pytest": 40, "fuzz": 30, "layer": 30, "e2e_sdxl": 60, "e2e_flux": 60}
PARTS = tuple(PART_BUDGET)
TOTAL_LIMIT = 450.0
# per-LoRA rank classes (rank-slice width x number of slices, unequal ranks, the largest rank)
RANK_CLASSES = (1, 7, 16, 17, 33, 48, 64, 65, 96, 100, 128, 200, 512)
METHODS = ("klora", "est", "merge", "kl")


# ------------------------------------------------------------------------------------- environment
def environment(dry_run: bool) -> dict:
    import torch

    from benchmarks.run import _device_name, _git_commit, _triton_version

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git_commit(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": _triton_version(), "cuda": torch.version.cuda or "none", "dry_run": dry_run,
        "host": platform.node(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("diffusers", "peft", "transformers"):  # versions without importing them (seconds each)
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "none"
    if torch.cuda.is_available() and not dry_run:
        info["device"] = _device_name(torch.device("cuda"))
        cap = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{cap[0]}{cap[1]}"
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
    else:
        info["device"] = _device_name(torch.device("cpu"))
        info["driver"] = "none (CPU)"
    return info


# ------------------------------------------------------------------------------------------ pytest
def part_pytest(out: Path, dry: bool, limit: float) -> dict:
    """The GPU-only tests (marker ``gpu``) without the interpreter; the dry run only collects them."""
    env = dict(os.environ, LORAFUSE_AUTOTUNE="0")  # correctness: one config per kernel variant, no tuning
    if not dry:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"]
    if dry:  # collect only, and only where the gpu tests live (collecting all of tests/ imports diffusers)
        cmd[3:4] = ["tests/kernels"]
        cmd.append("--collect-only")
    log = out / "pytest.log"
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_check] pytest stopped after its {limit:.0f} s limit\n")
            return {"status": "timeout", "note": f"stopped after {limit:.0f} s; see pytest.log"}
    last = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:]
    return {"status": "ok" if rc == 0 else "failed", "note": (last[0] if last else "") + f" (exit {rc})"}


# -------------------------------------------------------------------------------------------- fuzz
def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _lora_set(ranks, K, N, dtype, device, gen):
    import torch

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    return [(rnd(r, K, std=K**-0.5), rnd(N, r, std=0.3 * r**-0.5), s) for r, s in zip(ranks, (1.0, -0.75))]


def _fuzz_layer(case, device, gen):
    import torch

    M, K, N = case["M"], case["K"], case["N"]
    x = (torch.randn(M, K, generator=gen)).to(device, case["dtype"])
    W = (torch.randn(N, K, generator=gen) * K**-0.5).to(device, case["dtype"])
    b = (torch.randn(N, generator=gen) * 0.1).to(device, case["dtype"])
    return x, W, b, _lora_set(case["ranks"], K, N, case["dtype"], device, gen)


def _formula64(x3, W, b, loras, gates):
    """fp64 ``y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T`` (gates (batch, L)) and each d_i's row energy."""
    x64 = x3.double()
    y = x64 @ W.double().t() + b.double()
    energy = []
    for i, (A, B, s) in enumerate(loras):
        d = s * (x64 @ A.double().t()) @ B.double().t()
        y = y + gates[:, i].double().reshape(-1, 1, 1) * d
        energy.append((d * d).sum(-1).reshape(-1))
    return y, energy


def _sample_gates(case, num_loras, rows, device):
    import torch

    B = 2 if case["M"] % 2 == 0 else 1
    return torch.tensor(rows[:B], device=device)[:, :num_loras], B


def fuzz_fused(case, device, backend, gen):
    """fused_lora_linear with per-sample gates (+ statistics) vs the fp64 formula on the same device."""
    from lorafuse.kernels import fused_lora_linear

    x, W, b, loras = _fuzz_layer(case, device, gen)
    gates, B = _sample_gates(case, len(loras), [[1.0, 0.5], [0.0, -1.0]], device)
    x3 = x.reshape(B, -1, x.shape[-1])
    out = fused_lora_linear(x3, W, b, loras, gates, stats=case["stats"], backend=backend)
    y, st = out if case["stats"] else (out, None)
    ref, energy = _formula64(x3, W, b, loras, gates)
    checks = [("y", _rel(y, ref))]
    if st is not None:
        checks += [(f"energy{i}", _rel(st.energy[:, i], e)) for i, e in enumerate(energy)]
    return checks


def fuzz_shrink(case, device, backend, gen):
    from lorafuse.kernels import PackedLoRA, lora_shrink

    x, _, _, loras = _fuzz_layer(case, device, gen)
    packed = PackedLoRA.pack(loras, dtype=x.dtype)
    u = lora_shrink(x, packed, backend=backend)
    return [("u", _rel(u, x.double() @ packed.a.double().t()))]


def fuzz_fixup(case, device, backend, gen):
    """A speculative pass with the old gates, then the fix-up to the new ones, vs the fp64 formula."""
    from lorafuse.kernels import fused_lora_forward, lora_fixup

    x, W, b, loras = _fuzz_layer(case, device, gen)
    old, B = _sample_gates(case, len(loras), [[1.0, 0.0], [0.0, 1.0]], device)
    new, _ = _sample_gates(case, len(loras), [[0.0, 1.0], [0.0, 1.0]], device)
    x3 = x.reshape(B, -1, x.shape[-1])
    out = fused_lora_forward(x3, W, b, loras, old, stats=True, backend=backend)
    lora_fixup(out.y, out.u, out.packed, new - old, out.rows_per_sample, backend=backend)
    return [("y", _rel(out.y, _formula64(x3, W, b, loras, new)[0]))]


def fuzz_delta_stats(case, device, backend, gen):
    from lorafuse.kernels.delta_stats import lora_delta_topk_l1

    _, _, _, loras = _fuzz_layer(dict(case, M=1), device, gen)
    A, B, s = loras[-1]
    top, l1 = lora_delta_topk_l1(A, B, s, 64, backend=backend)
    rtop, rl1 = lora_delta_topk_l1(A, B, s, 64, backend="torch")
    return [("topk", abs(float(top - rtop)) / max(abs(float(rtop)), 1e-30)),
            ("l1", abs(float(l1 - rl1)) / max(abs(float(rl1)), 1e-30))]


def fuzz_merge(case, device, backend, gen):
    """W_eff = W + sum_i g_i s_i B_i A_i: one layer (merge_lora_weight) and the grouped rebuild
    (merge_flipped_weights, the layer flipped) vs the fp64 formula, in the weight's dtype."""
    import torch

    from lorafuse.kernels import PackedLoRA
    from lorafuse.kernels.merge_weight import MergeTable, merge_flipped_weights, merge_lora_weight

    _, W, _, loras = _fuzz_layer(dict(case, M=1), device, gen)
    packed = PackedLoRA.pack(loras, dtype=torch.float32)
    g = (0.8, -0.6)[: len(loras)]
    gates = torch.tensor(g, device=device)
    ref = W.double() + sum(gi * s * (B.double() @ A.double()) for (A, B, s), gi in zip(loras, g))
    single = merge_lora_weight(W, packed, gates, backend=backend)
    table, dst = MergeTable(1, len(loras), device), torch.empty_like(W)
    table.set(0, W, dst, packed)
    merge_flipped_weights(table, gates.reshape(1, -1), torch.full((1, len(loras)), math.nan, device=device),
                          backend=backend)
    return [("w_eff", _rel(single, ref)), ("grouped", _rel(dst, ref))]


#: kernel name -> fn(case, device, backend, generator) -> [(what, relative error)]; case holds M, K, N,
#: ranks (one or two LoRAs), dtype, stats. A new kernel adds one entry (and a tolerance below if needed).
FUZZ = {"fused_lora_linear": fuzz_fused, "lora_shrink": fuzz_shrink, "lora_fixup": fuzz_fixup,
        "lora_delta_topk_l1": fuzz_delta_stats, "merge_lora_weight": fuzz_merge}
# relative-error tolerance by activation dtype name (kernels' fp32 accumulation, operands rounded once)
FUZZ_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def fuzz_cases(dry: bool):
    """Every rank class at one of the DESIGN.md shapes (rotating), fp16; bf16 and statistics on alternate
    cases; the dry run at tiny shapes, fp32, a few rank classes."""
    import torch

    from benchmarks.run import SHAPES

    if dry:
        return [dict(M=6, K=16, N=24, ranks=(r, 4), dtype=torch.float32, stats=i % 2 == 0, shape="tiny")
                for i, r in enumerate((1, 48, 200))]
    cases = []
    for i, r in enumerate(RANK_CLASSES):
        name, M, K, N = SHAPES[i % len(SHAPES)]
        other = RANK_CLASSES[(i * 5 + 3) % len(RANK_CLASSES)]
        cases.append(dict(M=M, K=K, N=N, ranks=(r, other), dtype=torch.bfloat16 if i % 3 == 2 else torch.float16,
                          stats=i % 2 == 0, shape=name))
    return cases


def part_fuzz(out: Path, dry: bool, limit: float) -> dict:
    import torch

    device = torch.device("cpu" if dry else "cuda")
    t0 = time.perf_counter()
    rows, skipped = [], 0
    cases = fuzz_cases(dry)
    tune = os.environ.get("LORAFUSE_AUTOTUNE")
    os.environ["LORAFUSE_AUTOTUNE"] = "0"  # correctness only: compile one config per variant, no tuning
    for i, case in enumerate(cases):  # every kernel per case: a time limit cuts rank classes, not kernels
        for name, fn in FUZZ.items():
            if time.perf_counter() - t0 > limit:
                skipped += 1
                continue
            gen = torch.Generator().manual_seed(1000 + i)
            dname = str(case["dtype"]).replace("torch.", "")
            row = dict(kernel=name, shape=f"{case['shape']} {case['M']}x{case['K']}x{case['N']}",
                       ranks="-".join(map(str, case["ranks"])), dtype=dname, stats=case["stats"])
            t1 = time.perf_counter()
            try:
                for what, err in fn(case, device, "triton", gen):
                    rows.append(dict(row, check=what, rel_err=err, tol=FUZZ_TOL[dname],
                                     ok=bool(err <= FUZZ_TOL[dname]), seconds=round(time.perf_counter() - t1, 3),
                                     error=""))
            except Exception as exc:  # noqa: BLE001 - recorded, the other cases still run
                rows.append(dict(row, check="-", rel_err=math.nan, tol=FUZZ_TOL[dname], ok=False,
                                 seconds=round(time.perf_counter() - t1, 3),
                                 error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                if device.type == "cuda":
                    torch.cuda.synchronize()
        _write_csv(out / "fuzz.csv", rows)  # after every case: kept if this process is killed
    if tune is None:
        os.environ.pop("LORAFUSE_AUTOTUNE")
    else:
        os.environ["LORAFUSE_AUTOTUNE"] = tune
    _write_csv(out / "fuzz.csv", rows)
    _plot_fuzz(rows, out / "fuzz.png")
    bad = [r for r in rows if not r["ok"]]
    note = f"{len(rows) - len(bad)}/{len(rows)} checks within tolerance"
    if skipped:
        note += f", {skipped} case(s) not run (time limit)"
    return {"status": "ok" if not bad and not skipped else ("failed" if bad else "partial"), "note": note,
            "failures": [f"{r['kernel']} {r['shape']} r{r['ranks']} {r['dtype']} {r['check']}: "
                         + (r["error"] or f"rel err {r['rel_err']:.2e} > {r['tol']:.0e}") for r in bad][:20]}


def _plot_fuzz(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in dict.fromkeys(r["kernel"] for r in rows):
        pts = [(int(r["ranks"].split("-")[0]), r["rel_err"] / r["tol"]) for r in rows
               if r["kernel"] == name and r["rel_err"] == r["rel_err"]]
        if pts:
            ax.scatter(*zip(*pts), label=name, s=18)
    ax.axhline(1.0, color="red", lw=1, ls="--", label="tolerance")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank of LoRA 0")
    ax.set_ylabel("relative error / tolerance")
    ax.set_title("kernels vs torch reference (every rank class)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- layer
def part_layer(out: Path, dry: bool, limit: float) -> dict:
    from benchmarks import run as R

    import importlib.util

    argv = ["--csv", str(out / "layer.csv"), "--time-limit", str(max(1.0, limit - 25))]
    if importlib.util.find_spec("matplotlib") is not None:  # a bare lent-stack venv has none: tables only
        argv += ["--plot", "--plot-dir", str(out / "plots")]
    if dry:
        argv += ["--device", "cpu", "--shapes", "64x64x48", "--ranks", "8", "--rounds", "1",
                 "--probe-copy-mb", "8", "--probe-gemm-n", "128"]
    else:
        argv += ["--device", "cuda", "--dtypes", "float16", "--ranks", "16", "--gates", "both"]
    rc = R.main(argv)
    rows = list(csv.DictReader((out / "layer.csv").open())) if (out / "layer.csv").exists() else []
    ratios = {}
    for r in rows:
        if r["mode"] in ("events", "wallclock"):
            ratios.setdefault(r["provider"], []).append(float(r["vs_flinear"]))
    geo = {p: math.exp(statistics.fmean(math.log(v) for v in vs)) for p, vs in ratios.items() if vs}
    return {"status": "ok" if rc == 0 and rows else "failed", "note": f"{len(rows)} rows",
            "geomean_vs_flinear": geo}


# --------------------------------------------------------------------------------------------- e2e
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
FLUX_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def _build_denoiser(family: str, dry: bool, device, dtype):
    """(model, call kwargs, timestep divisor, LoRA targets) with random weights."""
    import torch

    from lorafuse.integrations import tiny

    g = torch.Generator(device="cpu").manual_seed(0)
    if family == "sdxl":
        if dry:
            model, B, lat, txt, width, pooled = tiny.sdxl_pipeline().unet, 2, 16, 77, 64, 32
        else:
            from diffusers import UNet2DConditionModel

            with torch.device(device), _default_dtype(dtype):  # built in place: no fp32 copy on the GPU
                model = UNet2DConditionModel(**SDXL_UNET)
            B, lat, txt, width, pooled = 2, 128, 77, 2048, 1280
        model = model.to(device, dtype).eval()
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(B, 1)
        kwargs = dict(sample=torch.randn(B, 4, lat, lat, generator=g), timestep=torch.tensor(500.0),
                      encoder_hidden_states=torch.randn(B, txt, width, generator=g),
                      added_cond_kwargs={"text_embeds": torch.randn(B, pooled, generator=g), "time_ids": time_ids})
        return model, _to(kwargs, device, dtype), 1000.0, tiny.ATTN_TARGETS
    if dry:
        model, img, txt, chans, width, pooled = tiny.flux_pipeline().transformer, 64, 8, 4, 32, 32
        guidance = None
    else:
        from diffusers import FluxTransformer2DModel

        with torch.device(device), _default_dtype(dtype):  # 12B parameters: 24 GB in bf16, never 48 in fp32
            model = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        img, txt, chans, width, pooled, guidance = 4096, 512, 64, 4096, 768, torch.tensor([3.5])
    model = model.to(device, dtype).eval()
    side = int(math.isqrt(img))
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kwargs = dict(hidden_states=torch.randn(1, img, chans, generator=g), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, txt, width, generator=g),
                  pooled_projections=torch.randn(1, pooled, generator=g), img_ids=img_ids.reshape(-1, 3),
                  txt_ids=torch.zeros(txt, 3), guidance=guidance, return_dict=False)
    return model, _to(kwargs, device, dtype), 1.0, tiny.FLUX_TARGETS


class _default_dtype:
    """``torch.set_default_dtype`` for the duration of a ``with`` block."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        import torch

        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        import torch

        torch.set_default_dtype(self.old)


def _to(obj, device, dtype):
    import torch

    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        keep = obj.dim() == 0 or (obj.dim() == 2 and obj.shape[-1] == 3)  # timestep, FLUX position ids: fp32
        return obj.to(device, torch.float32 if keep else dtype)
    return obj


def _add_loras(model, targets, ranks, seed=0):
    """Two PEFT adapters "subject" and "style" on ``targets`` with random A and B (B != 0)."""
    import torch
    from peft import LoraConfig

    g = torch.Generator().manual_seed(seed)
    for name, r in zip(("subject", "style"), ranks):
        model.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), init_lora_weights="gaussian"),
                          adapter_name=name)
    with torch.no_grad():
        for mod in model.modules():
            for name in ("subject", "style"):
                lb = getattr(mod, "lora_B", None)
                if lb is not None and name in lb:
                    w = lb[name].weight
                    w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w.device, w.dtype))
    model.set_adapters(["subject", "style"])


#: The step table's rows, in the order they run (a time limit cuts the tail): (variant, weights, mode,
#: cold). ``weights`` is accelerate_fusion's weights mode for the static methods ("scratch" default,
#: "inplace", "off": the fused low-rank path every call); kl always runs fused. ``cold``: the row also
#: times installation + first denoiser call with a fresh (cold) and then a reused (warm) Triton cache and
#: counts the kernel specialisations the cold start compiled: each method in its default mode, and the
#: static methods' fused path once (klora, "off"). kl compiled: "fused" is its default inside a graph on
#: CUDA (the registered Triton ops, ``compiled="auto"``), "plain" the traced plain ops
#: (``compiled="plain"``): which one is faster decides the default.
E2E_ROWS = (
    ("bare", "", "eager", False), ("peft", "", "eager", False),
    ("klora", "scratch", "eager", True), ("kl", "fused", "eager", True),
    ("klora_official", "", "eager", False),
    ("est", "scratch", "eager", True), ("merge", "scratch", "eager", True),
    ("klora", "off", "eager", True), ("klora", "inplace", "eager", False),
    ("est", "inplace", "eager", False), ("est", "off", "eager", False),
    ("merge", "inplace", "eager", False), ("merge", "off", "eager", False),
    ("bare", "", "compiled", False), ("klora", "scratch", "compiled", False), ("kl", "fused", "compiled", False),
    ("peft", "", "compiled", False), ("kl", "plain", "compiled", False),
)
#: the dry run compiles (backend "eager") only these (family, variant) rows: tracing the tiny SDXL UNet
#: through a patched LoRA layer alone takes ~20 s on a loaded CPU; FLUX proves that path in 0.5 s
DRY_COMPILED = {("sdxl", "bare"), ("flux", "bare"), ("flux", "klora")}
#: denoiser calls of one image at the pipelines' default step counts (SDXL with CFG: one batch-2 call)
STEPS = {"sdxl": 50, "flux": 28}


def _timer(dry: bool):
    """``bench(fn, est_s)`` -> median ms. Dry run: one timed call (the caller's first call was the
    warm-up; it proves the path only). GPU: ``triton.testing.do_bench`` medians for steps under 0.1 s
    (``est_s``: the row's warm first call), the median of 3-8 synchronised calls for slower ones (the
    FLUX step, the official K-LoRA layer), where do_bench's 5-call estimate alone would cost seconds."""
    if dry:
        def bench(fn, est_s=None):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return bench
    import torch
    from triton.testing import do_bench

    def bench(fn, est_s=None):
        if est_s is None or est_s < 0.1:
            return do_bench(fn, warmup=100, rep=600, return_mode="median")
        times = []
        for _ in range(max(3, min(8, int(2.0 / est_s)))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    return bench


def _by_name(counts: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in counts.items())


def part_e2e(family: str, out: Path, dry: bool, limit: float) -> dict:
    """The denoiser-step table of one model family (see :data:`E2E_ROWS`): per row the median step, the
    ratio to bare (same mode), the peak GPU memory (``max_memory_allocated``, reset per row; NaN on the
    CPU), the relative difference to PEFT, installation + first call, and for cold rows the same with a
    fresh Triton cache and the specialisations it compiled."""
    t0 = time.perf_counter()  # the imports count against the limit too
    import shutil
    import tempfile
    import warnings

    import torch

    import lorafuse
    from benchmarks import klora_official
    from benchmarks.compiling import compile_denoiser
    from benchmarks.triton_cache import cold_cache, compiled

    warnings.filterwarnings("ignore")
    device = torch.device("cpu" if dry else "cuda")
    cuda = device.type == "cuda"
    dtype = torch.float32 if dry else (torch.float16 if family == "sdxl" else torch.bfloat16)
    model, kwargs, divisor, targets = _build_denoiser(family, dry, device, dtype)
    _add_loras(model, targets, (16, 16))
    bench = _timer(dry)
    rows, notes = [], []
    cache_root = Path(tempfile.mkdtemp(prefix=f"lorafuse-triton-{family}-"))
    distinct: set[str] = set()  # cache keys of every specialisation the cold rows compiled

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def call(m=model):
        with torch.no_grad():
            return m(**kwargs)

    def first(o):
        return (o[0] if isinstance(o, (tuple, list)) else o.sample).float()

    def timed(fn):
        ts = time.perf_counter()
        res = fn()
        sync()
        return res, time.perf_counter() - ts

    ref = None
    compile_seconds = None if dry else {"sdxl": 40.0, "flux": 40.0}[family]  # first guess, then measured
    step_s = 0.0 if dry else {"sdxl": 0.1, "flux": 0.5}[family]  # first guess, then bare's measured step
    meta = dict(dtype=str(dtype).replace("torch.", ""), shape=_shape_note(family, dry), lora_ranks="16,16",
                steps_per_image=STEPS[family])

    def flush():
        """Rows so far, ratios to bare of the same mode, to e2e_<family>.csv (kept if this process is killed)."""
        for mode in ("eager", "compiled"):
            base = next((r for r in rows if r["mode"] == mode and r["variant"] == "bare" and r["status"] == "ok"), {})
            for r in rows:
                if r["mode"] == mode and "median_ms" in r:
                    r["x_bare"] = r["median_ms"] / base.get("median_ms", math.nan)
                    r["extra_peak_mb"] = r["peak_mem_mb"] - base.get("peak_mem_mb", math.nan)
        _write_csv(out / f"e2e_{family}.csv", [dict(meta, **r) for r in rows])

    if not dry:  # CUDA context, cuBLAS / cuDNN handles: not charged to the first row
        model.disable_adapters()
        timed(lambda: call())
    for variant, weights, mode, cold in E2E_ROWS:
        row = dict(model=family, variant=variant, weights=weights, mode=mode)
        label = f"{family} {variant}{'/' + weights if weights else ''} {mode}"
        left = limit - (time.perf_counter() - t0)
        if mode == "compiled":
            need = 5.0 if dry else compile_seconds * 1.3
        else:
            need = (30.0 if variant == "kl" else 15.0) if cold and not dry else 3.0 + 8 * step_s
            need *= 6 if variant == "klora_official" and not dry else 1
        if dry and mode == "compiled" and (family, variant) not in DRY_COMPILED:
            rows.append(dict(row, status="skipped (dry run)"))
            continue
        if left < need:
            rows.append(dict(row, status="skipped (time limit)"))
            continue
        rows.append(row)  # on file before it runs: a part killed at its limit shows which row it was in
        row["status"] = "started (not finished: the part's time limit or a crash ended it)"
        flush()
        handle = undo = None
        kw = dict(log_gates=False, timestep_divisor=divisor, progress=False)
        if variant in ("klora", "est", "merge"):
            kw["weights"] = weights
        elif variant == "kl" and weights == "plain":
            kw["compiled"] = "plain"

        def install():
            return lorafuse.accelerate_fusion(model, "subject", "style", variant, **kw)
        try:
            if variant == "bare":
                model.disable_adapters()
            else:
                model.enable_adapters()
                model.set_adapters(["subject", "style"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if variant in METHODS and cold and mode == "eager":
                folder = cache_root / f"{variant}-{weights}"
                with cold_cache(folder) as cc:  # a fresh cache: what a new process compiles and tunes
                    row["kernel_objects_reset"] = cc.cleared
                    handle, row["cold_install_s"] = timed(install)
                    _, row["cold_first_call_s"] = timed(lambda: first(call()))
                got = compiled(folder)
                distinct.update(got["keys"])
                row.update(kernels_compiled=got["kernels"], launchers_built=got["launchers"],
                           cache_mb=got["mb"], kernels_by_name=_by_name(got["by_name"]))
                handle.remove()
                handle = None
                cm = cold_cache(folder)  # the same cache again: a new process's warm start
            else:
                cm = contextlib.nullcontext()
            with cm:
                if variant in METHODS:
                    handle, row["install_s"] = timed(install)
                elif variant == "klora_official":
                    undo, row["install_s"] = timed(lambda: klora_official.install(model, num_steps=STEPS[family]))
                if mode == "compiled":
                    torch._dynamo.reset()
                    _, undo_compile = compile_denoiser(model, "regional", backend="eager" if dry else "inductor")
                    undo = _chain(undo_compile, undo)
                y, row["first_call_s"] = timed(lambda: first(call()))
            if mode == "compiled":
                compile_seconds = row["first_call_s"]
            if variant == "peft" and mode == "eager":
                ref = y
            est = step_s if mode == "compiled" else row["first_call_s"]  # a compiled first call is the compile
            ms = bench(lambda: call(), est)
            if variant == "bare" and mode == "eager":
                step_s = ms / 1e3
            row.update(status="ok", median_ms=ms, rel_diff_vs_peft=_rel(y, ref) if ref is not None else math.nan,
                       peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan,
                       mem_mb=torch.cuda.memory_allocated() / 2**20 if cuda else math.nan)
        except Exception as exc:  # noqa: BLE001 - recorded; the other rows still run
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            notes.append(f"{label}: {traceback.format_exc(limit=3)[-600:]}")
            if cuda:
                torch.cuda.synchronize()
        finally:
            if undo is not None:
                undo()
            if handle is not None:
                handle.remove()
        flush()
        print(f"[e2e] {label}: {rows[-1].get('status')} {rows[-1].get('median_ms', '')}", flush=True)
    flush()
    shutil.rmtree(cache_root, ignore_errors=True)
    rows = [dict(meta, **r) for r in rows]
    failed = [r for r in rows if r["status"].startswith("failed")]
    skipped = [r for r in rows if r["status"].startswith("skipped (time")]
    status = "failed" if failed else "partial" if skipped else "ok"
    note = f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} rows measured; the cold starts compiled " \
           f"{len(distinct)} distinct kernel specialisations in all"
    return {"status": status, "note": note, "rows": rows, "failures": notes[:6],
            "distinct_specialisations": len(distinct)}


def _chain(*undos):
    """One undo calling ``undos`` (None skipped) in order."""
    def undo():
        for u in undos:
            if u is not None:
                u()
    return undo


def _shape_note(family, dry):
    if dry:
        return "tiny config (lorafuse.integrations.tiny)"
    return "batch 2, 128x128 latents, 77 text tokens" if family == "sdxl" else "1024^2: 4096 image + 512 text tokens"


def _plot_e2e(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        variants = _display_order([r for r in rows if r["model"] == m])
        for j, mode in enumerate(("eager", "compiled")):
            vals = [next((float(r["x_bare"]) for r in rows if r["model"] == m and _label(r) == v
                          and r["mode"] == mode and r.get("x_bare") not in (None, "")), math.nan) for v in variants]
            ax.bar([i + 0.4 * j for i in range(len(variants))], vals, 0.4, label=mode)
        ax.set_xticks([i + 0.2 for i in range(len(variants))], variants, fontsize=7, rotation=45, ha="right")
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_ylabel("denoiser step time / bare (same mode)")
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ output
def _write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts, keys in first-seen order) to ``path``, floats to 6 significant digits."""
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _label(r) -> str:
    return r["variant"] + (f"/{r['weights']}" if r.get("weights") else "")


_ORDER = {"bare": 0, "peft": 1, "klora_official": 2, "klora": 3, "est": 4, "merge": 5, "kl": 6}
_WEIGHTS_ORDER = {"": 0, "scratch": 1, "inplace": 2, "off": 3, "fused": 4, "plain": 5}


def _display_order(rows) -> list[str]:
    """The labels of ``rows`` for the tables: bare, PEFT, the official layer, then each method's modes."""
    labels = {_label(r): (_ORDER.get(r["variant"], 9), _WEIGHTS_ORDER.get(r.get("weights", ""), 9)) for r in rows}
    return sorted(labels, key=lambda k: labels[k])


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v, spec: str, none: str = "n/a") -> str:
    v = _num(v)
    return none if v != v else format(v, spec)


def _e2e_summary(e2e: list[dict]) -> list[str]:
    """The step table (time, x bare, peak memory, diff to PEFT) and the time-to-first-image table."""
    for r in e2e:
        for key in ("median_ms", "x_bare", "rel_diff_vs_peft", "peak_mem_mb", "extra_peak_mb", "install_s",
                    "first_call_s", "cold_install_s", "cold_first_call_s", "kernels_compiled", "steps_per_image"):
            r[key] = _num(r.get(key))
    lines = ["", "## Denoiser step (median ms; x bare = same mode, same run; peak = `max_memory_allocated`, "
             "reset per row)", "",
             "| model | variant | eager ms | x bare | peak MB | + MB vs bare | compiled ms | x bare | rel diff vs PEFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["model"] for r in e2e):
        for v in _display_order([r for r in e2e if r["model"] == m]):
            cells = []
            for mode in ("eager", "compiled"):
                r = next((r for r in e2e if r["model"] == m and _label(r) == v and r["mode"] == mode), {})
                if r.get("status") == "ok":
                    cells += [f"{r['median_ms']:.2f}", _fmt(r.get("x_bare"), ".2f")]
                    if mode == "eager":
                        cells += [_fmt(r["peak_mem_mb"], ".0f", "n/a (CPU)"), _fmt(r["extra_peak_mb"], "+.0f")]
                else:
                    cells += [str(r.get("status", "-"))[:60], ""] + (["", ""] if mode == "eager" else [])
            er = next((r for r in e2e if r["model"] == m and _label(r) == v and r["mode"] == "eager"), {})
            lines.append(f"| {m} | {v} | " + " | ".join(cells) + f" | {_fmt(er.get('rel_diff_vs_peft'), '.2e')} |")
    shapes = {r["model"]: f"{r['shape']}, {r['dtype']}" for r in e2e}
    lines += [""] + [f"- {m}: {s}, two rank-16 LoRAs, random weights" for m, s in shapes.items()]
    lines += ["- weights: accelerate_fusion's mode for static methods (scratch: merged copy per layer; inplace: "
              "merged into the layer, original on the host; off: fused low-rank path per call); kl always fused",
              "- klora_official: the official K-LoRA layer (dense B A of both LoRAs, both top-K, a host-side "
              "choice, a dense fp32 delta GEMM on every layer call; `benchmarks/klora_official.py`)"]
    cold = [r for r in e2e if r["mode"] == "eager" and r.get("status") == "ok" and r["cold_first_call_s"] == r["cold_first_call_s"]]
    if cold:
        lines += ["", "## Time to first image (denoiser only: installation + first call, then the steady step)", "",
                  "| model | method | cold cache s | warm cache s | cold - warm s | kernels compiled | launchers | "
                  "first image cold / warm s |", "|---|---|---|---|---|---|---|---|"]
        for m in dict.fromkeys(r["model"] for r in cold):
            bare = next((r for r in e2e if r["model"] == m and r["variant"] == "bare" and r["mode"] == "eager"
                         and r.get("status") == "ok"), None)
            if bare is not None:
                n = bare["steps_per_image"]
                img = bare["first_call_s"] + (n - 1) * bare["median_ms"] / 1e3
                lines.append(f"| {m} | bare | {bare['first_call_s']:.2f} | {bare['first_call_s']:.2f} | 0 | 0 | 0 | "
                             f"{img:.1f} / {img:.1f} ({n:.0f} steps) |")
            for r in sorted((r for r in cold if r["model"] == m), key=lambda r: _display_order(cold).index(_label(r))):
                c, w = r["cold_install_s"] + r["cold_first_call_s"], r["install_s"] + r["first_call_s"]
                n, step = r["steps_per_image"], r["median_ms"] / 1e3
                lines.append(f"| {m} | {_label(r)} | {c:.2f} | {w:.2f} | {c - w:.2f} | {_fmt(r['kernels_compiled'], '.0f')} "
                             f"| {r.get('launchers_built', '')} | {c + (n - 1) * step:.1f} / {w + (n - 1) * step:.1f} "
                             f"({n:.0f} steps) |")
        lines += ["", "Cold: a fresh `TRITON_CACHE_DIR` and lorafuse's in-memory kernel caches emptied (what a new "
                  "process compiles and autotunes); warm: the same cache folder again (a new process's second run). "
                  "Kernels compiled: binaries in the fresh cache (kernel x specialisation x autotune config; 0 under "
                  "TRITON_INTERPRET, which compiles nothing); per kernel:"]
        lines += [f"- {r['model']} {_label(r)}: {r.get('kernels_by_name') or '-'}" for r in cold]
    lines += ["", "Rows: `e2e.csv`; plot: `e2e.png`."]
    return lines


def write_summary(out: Path, env: dict, results: dict, total_s: float) -> Path:
    lines = [f"# lorafuse GPU check: {env.get('device')}", ""]
    lines += ["| | |", "|---|---|"]
    for key in ("date", "device", "capability", "gpu_memory_gb", "driver", "cuda", "torch", "triton", "diffusers",
                "peft", "python", "git_commit", "dry_run", "wheels"):
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    lines.append(f"| total time | {total_s:.0f} s |")
    lines += ["", "## Parts", "", "| part | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', 0):.0f} | {r.get('limit', 0):.0f} | "
                     f"{str(r.get('note', '')).replace('|', '/')} |")
    for name, r in results.items():
        if r.get("failures"):
            lines += ["", f"### {name}: failures", ""] + [f"- `{f.strip()[:400]}`" for f in r["failures"]]
    layer = results.get("layer", {}).get("geomean_vs_flinear")
    if layer:
        lines += ["", "## Layer benchmark (geometric mean over cases, x F.linear, same run)", "",
                  "| provider | x F.linear |", "|---|---|"]
        lines += [f"| {p} | {v:.2f} |" for p, v in layer.items()]
        lines += ["", "Per case: `layer.csv`; plots: `plots/`."]
    e2e = list(csv.DictReader((out / "e2e.csv").open())) if (out / "e2e.csv").exists() else []
    if e2e:
        lines += _e2e_summary(e2e)
    lines += ["", "Logs: `logs/` (one per part), `pytest.log`; fuzz: `fuzz.csv`, `fuzz.png`.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


# -------------------------------------------------------------------------------------------- main
RUNNERS = {"pytest": part_pytest, "fuzz": part_fuzz, "layer": part_layer,
           "e2e_sdxl": lambda out, dry, limit: part_e2e("sdxl", out, dry, limit),
           "e2e_flux": lambda out, dry, limit: part_e2e("flux", out, dry, limit)}


def run_part(name: str, out: Path, dry: bool, limit: float) -> dict:
    """Run one part in this process; never raises (the failure is the result)."""
    t0 = time.perf_counter()
    try:
        res = RUNNERS[name](out, dry, limit)
    except Exception as exc:  # noqa: BLE001
        res = {"status": "failed", "note": f"{type(exc).__name__}: {str(exc)[:300]}",
               "failures": [traceback.format_exc()[-1500:]]}
    res["seconds"] = time.perf_counter() - t0
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _isolated(name: str, out: Path, dry: bool, limit: float) -> dict:
    """The part in a child process (hard time limit; a crash or a poisoned CUDA context stays there)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--part", name, "--limit", str(limit)]
    if dry:
        cmd.append("--dry-run")
    log = out / "logs" / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        # own session: a timeout ends the part and its children (inductor's compile workers) together
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit + 20)
        except subprocess.TimeoutExpired:
            rc = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    res_path = out / "logs" / f"{name}.json"
    if res_path.exists() and rc == 0:
        return json.loads(res_path.read_text())
    tail = log.read_text()[-1500:] if log.exists() else ""
    what = f"killed after {limit + 20:.0f} s" if rc is None else f"process exited with {rc}"
    return {"status": "timeout" if rc is None else "failed", "note": what + f"; see logs/{name}.log",
            "failures": [tail], "seconds": time.perf_counter() - t0}


def _fetch_wheels(dest: Path, with_matplotlib: bool) -> int:
    from benchmarks import wheels

    try:
        got = wheels.fetch(dest, with_matplotlib=with_matplotlib)
    except RuntimeError as exc:
        print(f"gpu_check --fetch-wheels: {exc}", file=sys.stderr)
        return 1
    for w in got:
        print(f"{w.stat().st_size / 2**20:7.2f} MB  {w.name}")
    total = sum(w.stat().st_size for w in got) / 2**20
    print(f"{len(got)} wheels, {total:.1f} MB in {dest}; their requirements are met by each other and the lent stack")
    return 0


def _install_wheels(src: Path) -> list[str]:
    """``--wheels``: unpack, put first on sys.path / PYTHONPATH (child processes inherit it), remove at exit."""
    import atexit
    import shutil

    from benchmarks import wheels

    target = wheels.install(src)
    atexit.register(shutil.rmtree, target, True)
    names = [f"{n}=={v}" for n, v in sorted(wheels.wheel_name(w) for w in src.glob("*.whl"))]
    print(f"[gpu_check] --wheels: {len(names)} wheels from {src} unpacked into {target}", flush=True)
    return names


def bundle(out: Path, dest: Path) -> Path:
    """``dest/gpu_check.tar.gz`` (the folder ``out``) and ``dest/summary.md``: two files, whatever ``out``
    holds (a lent machine returns at most 8 files, at most 2 folders deep)."""
    import shutil
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "gpu_check.tar.gz"
    with tarfile.open(tar, "w:gz") as f:
        f.add(out, arcname=out.name)
    shutil.copyfile(out / "summary.md", dest / "summary.md")
    return tar


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for every result (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, in-process: proves the check runs")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--time-limit", type=float, default=TOTAL_LIMIT, help="seconds for all parts together")
    p.add_argument("--in-process", action="store_true", help="no child process per part (default in --dry-run)")
    p.add_argument("--wheels", type=Path, metavar="DIR", help="first unpack the wheels in DIR (--fetch-wheels) "
                   "into a temporary folder put first on sys.path and PYTHONPATH: the lent machine's missing packages")
    p.add_argument("--bundle", type=Path, metavar="DIR", help="at the end, write DIR/gpu_check.tar.gz (the whole "
                   "--out folder) and DIR/summary.md, and print the summary (a lent machine returns <= 8 files)")
    p.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="only download, for CPython 3.12 manylinux "
                   "x86_64, the pinned wheels the lent machines lack (benchmarks/wheels.py) into DIR, and check them")
    p.add_argument("--with-matplotlib", action="store_true", help="--fetch-wheels: matplotlib and its wheels too")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child process: run one part
    p.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fetch_wheels:
        return _fetch_wheels(args.fetch_wheels, args.with_matplotlib)
    if args.out is None:
        p.error("--out is required (or --fetch-wheels DIR)")
    installed = _install_wheels(args.wheels) if args.wheels else None  # before anything imports diffusers
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: kernels through the interpreter
    else:
        os.environ.setdefault("LORAFUSE_AUTOTUNE", "1")
    if args.part:
        res = run_part(args.part, out, args.dry_run, args.limit or PART_BUDGET[args.part])
        return 0 if res["status"] != "crashed" else 1
    t_start = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    if args.dry_run:  # tiny shapes: one thread is 5-50x faster than two on a loaded 2-core CI machine
        torch.set_num_threads(1)
    try:
        return _run_parts(args, out, installed, t_start)
    finally:
        torch.set_num_threads(threads)


def _run_parts(args, out: Path, installed: list[str] | None, t_start: float) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU; use --dry-run on a CPU", file=sys.stderr)
        return 2
    env = environment(args.dry_run)
    if installed:
        env["wheels"] = " ".join(installed)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(f"gpu_check on {env['device']} | torch {env['torch']} triton {env['triton']} | commit {env['git_commit']}")
    budgets = DRY_BUDGET if args.dry_run else PART_BUDGET
    parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"gpu_check: unknown part(s) {unknown}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    for stale in ("e2e.csv", "e2e_sdxl.csv", "e2e_flux.csv"):
        if (out / stale).exists():
            (out / stale).unlink()
    results = {}
    in_process = args.in_process or args.dry_run
    for i, name in enumerate(parts):
        left = args.time_limit - (time.perf_counter() - t_start)
        # the rest of the parts keep their budgets: this part gets at most what they leave
        later = sum(budgets[n] for n in parts[i + 1:])
        limit = max(0.0, min(budgets[name], left - later * 0.5 if not args.dry_run else left))
        if limit < 5:
            results[name] = {"status": "skipped", "note": "total time limit reached", "limit": limit}
            continue
        print(f"[gpu_check] {name} (limit {limit:.0f} s) ...", flush=True)
        res = run_part(name, out, args.dry_run, limit) if in_process else _isolated(name, out, args.dry_run, limit)
        res["limit"] = limit
        results[name] = res
        print(f"[gpu_check] {name}: {res['status']} in {res.get('seconds', 0):.0f} s: {res.get('note', '')}",
              flush=True)
    e2e_rows = [r for fam in ("sdxl", "flux") if (out / f"e2e_{fam}.csv").exists()
                for r in csv.DictReader((out / f"e2e_{fam}.csv").open())]
    _write_csv(out / "e2e.csv", e2e_rows)
    _plot_e2e(e2e_rows, out / "e2e.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    path = write_summary(out, env, results, time.perf_counter() - t_start)
    print(f"[gpu_check] wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    if args.bundle:
        tar = bundle(out, args.bundle)
        print(path.read_text())
        print(f"[gpu_check] bundle: {tar} ({tar.stat().st_size / 2**20:.1f} MB) and {args.bundle / 'summary.md'}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
