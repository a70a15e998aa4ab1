"""The gate heatmap: layers (rows) x denoiser calls (columns) of a :attr:`FusionHandle.gate_log`.

Each cell is the subject gate of one layer at one denoiser call: 1 = the subject LoRA acts, 0 = the
style LoRA acts (K-LoRA, EST: one or the other; merge: both at their weights). Per-sample gates (KL
decides per sample, e.g. for the unconditional and the conditional half of a classifier-free guidance
batch) are averaged over the samples, so a cell between 0 and 1 (grey) means the samples disagreed.
Columns are numbered from 1, as the console's "step 1" (one denoiser call per step when the
pipeline batches classifier-free guidance). Rows are labelled with the layers' module paths when
there are few enough to read; the index is the position in ``handle.layer_names`` otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

MAX_NAMED_ROWS = 64


def gate_grid(log: list[dict], which: str = "subject") -> tuple[list[int], list[int], list[list[float]], bool]:
    """(layer indices, call numbers, grid[layer][call] with NaN where a layer did not run, whether any
    gate was per sample) from a gate log."""
    if which not in ("subject", "style"):
        raise ValueError(f"plot_gate_log: which must be 'subject' or 'style', got {which!r}")
    if not log:
        raise ValueError("plot_gate_log: the gate log is empty (run the pipeline with log_gates=True first)")
    layers = sorted({e["layer_index"] for e in log})
    calls = sorted({e["call"] for e in log})
    li = {v: i for i, v in enumerate(layers)}
    ci = {v: i for i, v in enumerate(calls)}
    grid = [[float("nan")] * len(calls) for _ in layers]
    per_sample = False
    for e in log:
        g = e[which]
        if isinstance(g, (list, tuple)):
            per_sample = per_sample or len(g) > 1
            g = sum(g) / len(g)
        grid[li[e["layer_index"]]][ci[e["call"]]] = float(g)
    return layers, calls, grid, per_sample


def _short(names: Sequence[str]) -> list[str]:
    """Module paths without the prefix they all share (``down_blocks.0.attentions.0...`` stays)."""
    common = os.path.commonprefix(list(names))
    common = common[: common.rfind(".") + 1] if "." in common else ""
    return [n[len(common):] for n in names]


def plot_gate_log(log: list[dict], path, *, which: str = "subject", layer_names: Sequence[str] | None = None,
                  title: str | None = None) -> None:
    """Write a PNG heatmap of ``log`` (see the module docstring) to ``path``; needs matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
    except ImportError as e:
        raise ImportError('the gate heatmap needs matplotlib: pip install "lorafuse[plot]"') from e
    import numpy as np

    layers, calls, grid, per_sample = gate_grid(log, which)
    data = np.array(grid, dtype=float)
    named = layer_names is not None and len(layers) <= MAX_NAMED_ROWS
    label_width = 0.0
    if named:
        labels = _short([layer_names[i] if i < len(layer_names) else str(i) for i in layers])
        labels = [f"{i}: {n}" for i, n in zip(layers, labels)]
        label_width = 0.055 * max(len(s) for s in labels)
    fig = Figure(figsize=(max(5.0, 0.3 * len(calls) + 3 + label_width), max(3.5, 0.16 * len(layers) + 2)))
    ax = fig.subplots()
    vmax = max(1.0, float(np.nanmax(np.nan_to_num(data, nan=0.0))))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="coolwarm", vmin=0.0, vmax=vmax)
    ax.set_xticks(range(len(calls)))
    ax.set_xticklabels([str(k + 1) for k in range(len(calls))], fontsize=7)
    ax.set_xlabel("denoising step (denoiser call, from 1)")
    if named:
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_ylabel("layer")
    else:
        ax.set_ylabel("layer index (names: handle.layer_names, report.json layer_names)")
    other = "style" if which == "subject" else "subject"
    ax.set_title(title or f"{which} gate per layer and step")
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(f"{which} gate (1 = {which} acts, 0 = {other} acts)")
    if per_sample:
        fig.text(0.01, 0.01, "per-sample gates, averaged: grey (between 0 and 1) = the samples of the batch\n"
                 "(e.g. the unconditional and conditional halves of CFG) chose differently", fontsize=7)
    fig.tight_layout(rect=(0, 0.05 if per_sample else 0, 1, 1))
    fig.savefig(path, dpi=100)
