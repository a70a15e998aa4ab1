"""Run a sweep: generate every pending item (split between processes), score, merge.

One process per device. Under ``torchrun`` / ``accelerate launch`` the processes find each other
through :class:`accelerate.PartialState` (``cpu=True`` on CPUs: gloo). Phases, separated by
barriers so that every process sees the same files:

1. every process lists the finished items (:func:`lorafuse.sweep.items.finished`), then takes its
   contiguous share of the pending ones (``split_between_processes``: no item twice, none lost);
2. each process loads the pipeline once, keeps the current pair's two LoRAs loaded (adapters
   ``"subject"`` / ``"style"``; a pair change deletes and reloads only the LoRA that changes) and one
   :func:`lorafuse.accelerate_fusion` installation per (pair, method), and writes per item the image
   then one JSON line; an item that raises is recorded as failed and the sweep goes on;
3. the finished items without scores are split again and scored in batches (CLIP / DINO);
4. the main process merges everything into the summary (:mod:`lorafuse.sweep.summary`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from ..integrations.step_timer import StepTimer
from .items import Item, append_line, finished, image_path, make_items, read_lines
from .spec import Spec, render

SUBJECT, STYLE = "subject", "style"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# test hook: a process SIGKILLs itself after committing this many items (resume tests)
KILL_AFTER_ENV = "LORAFUSE_SWEEP_KILL_AFTER"


def quiet_libraries() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")  # pair changes


def load_pipeline(spec: Spec, device: torch.device, dtype: torch.dtype):
    """The SPEC's pipeline on ``device``: an embedded tiny one, a local folder or a hub id."""
    if spec.model.startswith("lorafuse:"):
        from ..integrations.tiny import sd15_pipeline

        pipe = sd15_pipeline(spec.model.split(":", 1)[1].split("-")[0])
    else:
        from diffusers import DiffusionPipeline

        from ..integrations.compat import diffusers_dtype_kwargs

        pipe = DiffusionPipeline.from_pretrained(spec.model, **diffusers_dtype_kwargs(dtype))
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer to fuse LoRAs into")


def gate_summary(log: list[dict], num_layers: int) -> dict:
    """Share of subject over layer calls: overall, per denoiser call (step) and per layer (index as
    in ``handle.layer_names``); per-sample gates count by their mean."""
    if not log:
        return {"subject_share": None, "subject_share_by_step": [], "subject_share_by_layer": []}
    by_step: dict[int, list[float]] = {}
    by_layer: dict[int, list[float]] = {}
    for e in log:
        g = e["subject"]
        g = sum(g) / len(g) if isinstance(g, list) else float(g)
        by_step.setdefault(e["call"], []).append(g)
        by_layer.setdefault(e["layer_index"], []).append(g)
    every = [g for v in by_step.values() for g in v]
    return {
        "subject_share": round(sum(every) / len(every), 6),
        "subject_share_by_step": [round(sum(v) / len(v), 4) for _, v in sorted(by_step.items())],
        "subject_share_by_layer": [round(sum(by_layer[i]) / len(by_layer[i]), 4) if i in by_layer else None
                                   for i in range(num_layers)],
    }


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Generator:
    """One process's generation state: the pipeline, the loaded pair, the installed fusion."""

    def __init__(self, spec: Spec, out: Path, device: torch.device, rank: int, dino=None):
        self.spec, self.out, self.device, self.rank = spec, out, device, rank
        dtype = _DTYPES[spec.dtype] if spec.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        self.dtype = dtype
        self.pipe = load_pipeline(spec, device, dtype)
        self.denoiser = denoiser_of(self.pipe)
        self.loaded: dict[str, str | None] = {SUBJECT: None, STYLE: None}  # role -> LoRA name
        self.handle = None
        self.handle_key = None
        self.dino = dino  # for est D=auto
        self.reloads = 0
        self.record_file = out / "records" / f"rank{rank}.jsonl"

    # -- state changes --
    def _remove_handle(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle, self.handle_key = None, None

    def _ensure_pair(self, item: Item) -> None:
        want = {SUBJECT: self.spec.subjects[item.subject], STYLE: self.spec.styles[item.style]}
        if all(self.loaded[r] == want[r].name for r in want):
            return
        self._remove_handle()
        try:
            for role, entry in want.items():
                if self.loaded[role] == entry.name:
                    continue
                if self.loaded[role] is not None:
                    with warnings.catch_warnings():  # "Adapter subject was active which is now deleted": expected
                        warnings.simplefilter("ignore", UserWarning)
                        self.pipe.delete_adapters(role)
                    self.loaded[role] = None
                self.pipe.load_lora_weights(entry.file, adapter_name=role)
                self.loaded[role] = entry.name
                self.reloads += 1
            self.pipe.set_adapters([SUBJECT, STYLE], [1.0, 1.0])
        except BaseException:  # a half-loaded pair: start clean at the next item
            for role in (SUBJECT, STYLE):
                if self.loaded[role] is not None or role in self._adapters():
                    with contextlib.suppress(Exception), warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        self.pipe.delete_adapters(role)
                self.loaded[role] = None
            raise

    def _adapters(self) -> list[str]:
        with contextlib.suppress(Exception):
            return list(getattr(self.denoiser, "peft_config", None) or {})
        return []

    def _call_kwargs(self, prompt: str, seed: int) -> dict:
        s = self.spec
        kw = {"prompt": prompt, "num_inference_steps": s.steps,
              "generator": torch.Generator(device="cpu").manual_seed(seed)}
        for k in ("negative_prompt", "guidance_scale", "height", "width"):
            if getattr(s, k) is not None:
                kw[k] = getattr(s, k)
        return kw

    def _options(self, item: Item, prompt: str) -> dict:
        method = self.spec.methods[item.method]
        options = dict(method.options)
        if method.probe:
            from ..guidance.est import style_discrepancy

            self._remove_handle()  # the probe installs its own handles
            kw = self._call_kwargs(prompt, 0)
            kw.pop("prompt"), kw.pop("generator")
            options["D"] = style_discrepancy(self.pipe, prompt, SUBJECT, STYLE, self.dino, seed=0, **kw)
        return options

    def _ensure_handle(self, item: Item, options: dict) -> None:
        from .. import accelerate_fusion

        method = self.spec.methods[item.method]
        key = (item.pair, item.method, json.dumps(options, sort_keys=True))
        if self.handle is not None and self.handle_key == key:
            return
        self._remove_handle()
        self.handle = accelerate_fusion(self.pipe, SUBJECT, STYLE, method=method.name, backend=self.spec.backend,
                                        **options)
        self.handle_key = key

    # -- one item --
    def generate(self, item: Item) -> dict:
        spec = self.spec
        subject, style, method = spec.subjects[item.subject], spec.styles[item.style], spec.methods[item.method]
        prompt = render(spec.prompts[item.prompt], subject, style)
        record = {"key": item.key, "index": item.index, "subject": subject.name, "style": style.name,
                  "method": method.label, "method_name": method.name, "options": method.options,
                  "prompt_index": item.prompt, "prompt": prompt, "seed": item.seed, "rank": self.rank}
        t0 = time.perf_counter()
        record["started"] = round(time.time(), 3)
        try:
            self._ensure_pair(item)
            options = self._options(item, prompt)
            self._ensure_handle(item, options)
            self.handle.clear_gate_log()
            fallbacks_before = dict(self.handle.fallbacks)
            timer = StepTimer(self.denoiser, self.device)
            try:
                with torch.no_grad():
                    image = self.pipe(**self._call_kwargs(prompt, item.seed), output_type="pil").images[0]
            finally:
                timer.remove()
            path = image_path(self.out, item)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            fallbacks = {k: v - fallbacks_before.get(k, 0) for k, v in self.handle.fallbacks.items()
                         if v - fallbacks_before.get(k, 0)}
            per_step = timer.median()
            record.update({
                "status": "ok", "image": str(path.relative_to(self.out)),
                "resolved_options": options if method.probe else None,
                "seconds": round(time.perf_counter() - t0, 4),
                "ms_per_step": round(1e3 * per_step, 4) if per_step is not None else None,
                "denoiser_calls": len(timer.times),
                "layers_fused": self.handle.num_layers, "fallback_calls": fallbacks,
                **gate_summary(self.handle.gate_log, self.handle.num_layers),
            })
            self.handle.clear_gate_log()
            if getattr(self.handle.method, "dynamic", False):
                # KL's speculative mode starts each layer call from the gates it applied last, so without a
                # fresh installation an image would depend (at rounding level) on the item generated before
                self._remove_handle()
        except Exception as exc:  # recorded; the sweep goes on
            with contextlib.suppress(Exception):
                self._remove_handle()
            record.update({"status": "failed", "error": _error_text(exc),
                           "seconds": round(time.perf_counter() - t0, 4)})
        record["finished"] = round(time.time(), 3)
        append_line(self.record_file, record)
        return record

    def close(self) -> None:
        self._remove_handle()


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------
def make_state(cpu: bool):
    from accelerate import PartialState

    return PartialState(cpu=cpu or not torch.cuda.is_available())


def _progress(total: int, rank: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, position=rank, desc=f"[{rank}] {desc}", leave=False, disable=not enabled or total == 0,
                dynamic_ncols=True, file=sys.stderr)


def run_sweep(spec: Spec, out: Path, state, *, progress: bool = True, score_every: int = 0, log=print) -> dict:
    """Generate and score this process's share; on the main process merge and write the summary.
    Returns the merged summary on the main process and {} elsewhere."""
    from . import scoring, summary

    out = Path(out)
    rank = state.process_index
    items = make_items(spec)
    done = finished(out, items)
    state.wait_for_everyone()  # nobody writes a record before every process has listed the finished ones
    pending = [it for it in items if it.key not in done]
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    if state.is_main_process:
        log(f"lorafuse sweep: {len(items)} items ({len(done)} finished, {len(pending)} to generate) on "
            f"{state.num_processes} process(es); output {out}")

    scorers = None
    if spec.scorers.get("clip") or spec.scorers.get("dino"):
        if score_every or any(m.probe for m in spec.methods):
            scorers = scoring.Scorers.load(spec, state.device)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    if mine:
        quiet_libraries()
        gen = Generator(spec, out, state.device, rank, dino=scorers.dino if scorers else None)
        bar = _progress(len(mine), rank, "generate", progress)
        unscored: list[dict] = []
        try:
            for n, item in enumerate(mine, 1):
                rec = gen.generate(item)
                bar.update(1)
                if rec["status"] == "ok" and score_every and scorers is not None:
                    unscored.append(rec)
                    if len(unscored) >= score_every:
                        scoring.score_records(spec, out, unscored, scorers, rank)
                        unscored = []
                if kill_after and n >= kill_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
            if unscored:
                scoring.score_records(spec, out, unscored, scorers, rank)
        finally:
            bar.close()
            gen.close()
        del gen
    state.wait_for_everyone()

    if spec.scorers.get("clip") or spec.scorers.get("dino"):
        scored = scoring.scored_keys(spec, out)
        todo = [r for r in _ok_records(out, items) if r["key"] not in scored]
        state.wait_for_everyone()  # every process has the same list before anyone appends a score
        with state.split_between_processes(todo) as my_todo:
            my_todo = list(my_todo)
        if my_todo:
            if scorers is None:
                scorers = scoring.Scorers.load(spec, state.device)
            bar = _progress(len(my_todo), rank, "score", progress)
            bs = spec.scorers["batch_size"]
            for i in range(0, len(my_todo), bs):
                scoring.score_records(spec, out, my_todo[i:i + bs], scorers, rank)
                bar.update(len(my_todo[i:i + bs]))
            bar.close()
        state.wait_for_everyone()

    if not state.is_main_process:
        return {}
    return summary.write_summary(spec, out, items)


def _ok_records(out: Path, items: list[Item]) -> list[dict]:
    done = finished(out, items)
    return [done[it.key] for it in items if it.key in done]


__all__ = ["Generator", "StepTimer", "gate_summary", "load_pipeline", "make_state", "run_sweep", "read_lines"]
