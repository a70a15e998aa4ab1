"""The merged results of a sweep (main process): one row per method, contact sheets, the trade-off plot.

Per method, over its finished items: mean and 95% interval (Student t: mean +- t_{0.975, n-1} s / sqrt(n))
of subject fidelity (DINO), style fidelity (CLIP image), text alignment (CLIP text), time per
denoiser step (ms) and share of subject (fraction of layer calls where the subject acts).

Writes ``results.jsonl`` (every item in item order: its record with its scores), ``summary.csv``,
``summary.md`` (the table, notes on what was not scored, the failures), ``sheets/<pair>.png``
(methods x prompts as rows, seeds as columns, labelled) and ``scatter.png`` (subject vs style
fidelity, one colour per method, its mean as a large marker; needs matplotlib).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .items import Item, atomic_write_text, image_path, pair_name, pair_order, read_lines
from .scoring import SCORES, scored_keys, skipped_notes
from .spec import Spec

COLUMNS = SCORES + ("ms_per_step", "subject_share")
TITLES = {"subject_dino": "subject (DINO)", "style_clip": "style (CLIP-I)", "text_clip": "text (CLIP-T)",
          "ms_per_step": "ms / step", "subject_share": "subject share"}
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (then 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95% interval); the half-width is None for fewer than two values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    return m, t * s / math.sqrt(len(v))


def merge(spec: Spec, out: Path, items: list[Item]) -> list[dict]:
    """One row per item in item order: the latest "ok" record (else the latest failure, else
    "missing"), with its current scores."""
    recs: dict[str, dict] = {}
    for r in read_lines(out / "records"):
        prev = recs.get(r["key"])
        if r.get("status") == "ok" or prev is None or prev.get("status") != "ok":
            recs[r["key"]] = r
    scores = scored_keys(spec, out)
    rows = []
    for it in items:
        r = dict(recs.get(it.key) or {"key": it.key, "status": "missing"})
        if r.get("status") == "ok" and not image_path(out, it).is_file():
            r = {"key": it.key, "status": "missing"}
        r.setdefault("method", spec.methods[it.method].label)
        s = scores.get(it.key, {})
        for k in SCORES:
            r[k] = s.get(k)
        rows.append(r)
    return rows


def method_table(spec: Spec, rows: list[dict]) -> list[dict]:
    table = []
    for m in spec.methods:
        mine = [r for r in rows if r["method"] == m.label]
        ok = [r for r in mine if r.get("status") == "ok"]
        row = {"method": m.label, "items": len(mine), "ok": len(ok),
               "failed": sum(r.get("status") == "failed" for r in mine),
               "missing": sum(r.get("status") == "missing" for r in mine)}
        for col in COLUMNS:
            mean, ci = mean_ci([r.get(col) for r in ok])
            row[f"{col}_mean"], row[f"{col}_ci95"], row[f"{col}_n"] = mean, ci, sum(r.get(col) is not None for r in ok)
        table.append(row)
    return table


def _fmt(mean, ci, digits=3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def table_markdown(table: list[dict]) -> str:
    head = ["method", "items", "ok", "failed"] + [TITLES[c] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["method"], str(r["items"]), str(r["ok"]), str(r["failed"])]
        cells += [_fmt(r[f"{c}_mean"], r[f"{c}_ci95"], 2 if c == "ms_per_step" else 3) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["method", "items", "ok", "failed", "missing"]
    fields += [f"{c}_{k}" for c in COLUMNS for k in ("mean", "ci95", "n")]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    return buf.getvalue()


def contact_sheet(spec: Spec, out: Path, items: list[Item], rows: list[dict], subject: int, style: int, path: Path,
                  cell: int = 128) -> None:
    """Rows: methods (x prompts when several), columns: seeds; labels on the left and on top."""
    from PIL import Image, ImageDraw, ImageFont

    status = {r["key"]: r.get("status") for r in rows}
    mine = [it for it in items if it.pair == (subject, style)]
    row_keys = list(dict.fromkeys((it.method, it.prompt) for it in mine))
    seeds = list(spec.seeds)
    font = ImageFont.load_default()
    label_w, head_h, pad = 170, 22, 4
    sheet = Image.new("RGB", (label_w + len(seeds) * (cell + pad) + pad, head_h + len(row_keys) * (cell + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), pair_name(spec, subject, style), fill="black", font=font)
    for j, seed in enumerate(seeds):
        draw.text((label_w + j * (cell + pad) + cell // 2 - 16, 4), f"seed {seed}", fill="black", font=font)
    by = {(it.method, it.prompt, it.seed): it for it in mine}
    for i, (m, p) in enumerate(row_keys):
        y = head_h + i * (cell + pad)
        label = spec.methods[m].label + (f"\nprompt {p}" if len(spec.prompts) > 1 else "")
        draw.multiline_text((pad, y + cell // 2 - 8), label, fill="black", font=font)
        for j, seed in enumerate(seeds):
            it = by[(m, p, seed)]
            x = label_w + j * (cell + pad)
            if status.get(it.key) == "ok":
                with Image.open(image_path(out, it)) as im:
                    sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            else:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(220, 220, 220))
                draw.text((x + 8, y + cell // 2 - 6), status.get(it.key) or "missing", fill=(160, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(path)


def scatter(spec: Spec, rows: list[dict], table: list[dict], path: Path) -> bool:
    """Subject fidelity (x) vs style fidelity (y) per method; False when matplotlib or scores are missing."""
    pts = [r for r in rows if r.get("subject_dino") is not None and r.get("style_clip") is not None]
    if not pts:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(spec.methods):
        mine = [r for r in pts if r["method"] == m.label]
        if not mine:
            continue
        color = f"C{i % 10}"
        ax.scatter([r["subject_dino"] for r in mine], [r["style_clip"] for r in mine], s=14, alpha=0.5, color=color)
        t = next(t for t in table if t["method"] == m.label)
        ax.scatter([t["subject_dino_mean"]], [t["style_clip_mean"]], s=120, marker="*", color=color,
                   edgecolors="black", label=f"{m.label} (n={len(mine)})")
    ax.set_xlabel("subject fidelity (DINO cosine to the subject references)")
    ax.set_ylabel("style fidelity (CLIP image cosine to the style reference)")
    ax.set_title("subject vs style fidelity per method (star: mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_summary(spec: Spec, out: Path, items: list[Item]) -> dict:
    out = Path(out)
    rows = merge(spec, out, items)
    table = method_table(spec, rows)
    notes = skipped_notes(spec)
    ok = [r for r in rows if r.get("status") == "ok"]
    for col, why in (("text_clip", "text alignment"), ("subject_dino", "subject fidelity"),
                     ("style_clip", "style fidelity")):
        if ok and all(r.get(col) is None for r in ok) and not any(why in n or "scoring skipped" in n for n in notes):
            notes.append(f"{why} skipped: no scores (see the scorer notes above; a CLIP folder without a text "
                         "tower gives no text alignment)")
    failures = [r for r in rows if r.get("status") == "failed"]
    missing = [r for r in rows if r.get("status") == "missing"]

    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(out / "summary.csv", table_csv(table))
    sheets = []
    for c, s in pair_order(len(spec.subjects), len(spec.styles)):
        path = out / "sheets" / f"{pair_name(spec, c, s)}.png"
        contact_sheet(spec, out, items, rows, c, s, path)
        sheets.append(str(path.relative_to(out)))
    has_scatter = scatter(spec, rows, table, out / "scatter.png")
    if not has_scatter:
        notes.append("no scatter plot: " + ("matplotlib is not installed" if ok and any(
            r.get("subject_dino") is not None and r.get("style_clip") is not None for r in ok)
            else "it needs both subject (DINO) and style (CLIP) scores"))

    md = [f"# lorafuse sweep: {Path(spec.path).name}", "",
          f"{len(items)} items: {len(spec.subjects)} subjects x {len(spec.styles)} styles x {len(spec.prompts)} "
          f"prompts x {len(spec.methods)} methods x {len(spec.seeds)} seeds; model {spec.model}, {spec.steps} steps. "
          "Mean ± 95% interval over each method's finished items.", "", table_markdown(table), ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if failures:
        md += [f"Failed items ({len(failures)}):", ""] + [f"- `{r['key']}`: {r.get('error')}" for r in failures] + [""]
    if missing:
        md += [f"Missing items ({len(missing)}): not generated (run the same command again to finish them)", ""]
    md += ["Contact sheets: " + ", ".join(f"`{s}`" for s in sheets) + (". Trade-off plot: `scatter.png`." if
                                                                       has_scatter else "."), ""]
    atomic_write_text(out / "summary.md", "\n".join(md))
    return {"table": table, "rows": rows, "notes": notes, "failures": failures, "missing": missing,
            "sheets": sheets, "scatter": "scatter.png" if has_scatter else None}
