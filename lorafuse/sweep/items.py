"""Work items: one generated image per (LoRA pair, prompt, method, seed), in a fixed order.

Order (the same in every process, so a contiguous split between processes is deterministic):
pairs in "snake" order (subject 0 with styles 0..S-1, subject 1 with styles S-1..0, ...: two
consecutive pairs share one LoRA, so a pair change reloads one file), then methods (one fusion
installation per pair and method), then prompts, then seeds.

An item's key is also its image path without ``.png``: ``"{subject}+{style}/{method slug}/p{prompt}-s{seed}"``.

The output folder:

    spec.json                  the SPEC this folder belongs to (generation fingerprint)
    images/<key>.png           one image per finished item
    records/rank<R>.jsonl      one JSON line per generated (or failed) item, appended by process R
    scores/rank<R>.jsonl       one JSON line per scored item
    results.jsonl, summary.csv, summary.md, sheets/<pair>.png, scatter.png    written by the main process

An item is finished when its image exists and an "ok" line names it (image first, atomically by
rename; then the line, in one append).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .spec import Spec, SpecError


@dataclass(frozen=True)
class Item:
    index: int
    subject: int  # index into spec.subjects
    style: int
    method: int  # index into spec.methods
    prompt: int
    seed: int
    key: str

    @property
    def pair(self) -> tuple[int, int]:
        return self.subject, self.style


def pair_order(num_subjects: int, num_styles: int) -> list[tuple[int, int]]:
    """Snake order: consecutive pairs differ in one LoRA."""
    out = []
    for c in range(num_subjects):
        styles = range(num_styles) if c % 2 == 0 else range(num_styles - 1, -1, -1)
        out.extend((c, s) for s in styles)
    return out


def pair_name(spec: Spec, subject: int, style: int) -> str:
    return f"{spec.subjects[subject].name}+{spec.styles[style].name}"


def make_items(spec: Spec) -> list[Item]:
    items = []
    for c, s in pair_order(len(spec.subjects), len(spec.styles)):
        for m, method in enumerate(spec.methods):
            for p in range(len(spec.prompts)):
                for seed in spec.seeds:
                    key = f"{pair_name(spec, c, s)}/{method.slug}/p{p}-s{seed}"
                    items.append(Item(len(items), c, s, m, p, seed, key))
    return items


# ------------------------------------------------------------------------------------------------
# the output folder
# ------------------------------------------------------------------------------------------------
def image_path(out: Path, item: Item) -> Path:
    return out / "images" / f"{item.key}.png"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_line(path: Path, record: dict) -> None:
    """One JSON line, in one write on an O_APPEND descriptor, flushed to disk. A line torn by a kill
    (no newline at the end) is skipped by :func:`read_lines` and the next append starts a new line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(folder: Path) -> list[dict]:
    """Every complete JSON line of ``folder/*.jsonl`` (files sorted by name, lines in order)."""
    out = []
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # torn by a kill
                continue
            if isinstance(rec, dict) and "key" in rec:
                out.append(rec)
    return out


def finished(out: Path, items: list[Item]) -> dict[str, dict]:
    """key -> the "ok" record of every finished item (image present)."""
    by_key = {it.key: it for it in items}
    done = {}
    for rec in read_lines(out / "records"):
        it = by_key.get(rec["key"])
        if it is not None and rec.get("status") == "ok" and image_path(out, it).is_file():
            done[rec["key"]] = rec
    return done


def claim_output(spec: Spec, out: Path) -> None:
    """Bind ``out`` to this SPEC: write ``spec.json`` (atomically) in a new or empty folder; refuse a
    folder that holds another SPEC's sweep (:class:`SpecError` naming what changed)."""
    marker = out / "spec.json"
    mine = {"fingerprint": spec.fingerprint(), "generation": spec.generation(), "spec_file": spec.path}
    if marker.is_file():
        try:
            theirs = json.loads(marker.read_text())
        except ValueError:
            raise SpecError(f"output {str(out)!r}: spec.json is not readable JSON; use another output folder") from None
        if theirs.get("fingerprint") != mine["fingerprint"]:
            old = theirs.get("generation") or {}
            changed = [k for k in mine["generation"] if old.get(k) != mine["generation"][k]] or ["(format)"]
            raise SpecError(
                f"output {str(out)!r}: holds a sweep of a different SPEC (changed: {', '.join(changed)}); "
                "results would mix: use another output folder (--out) or restore the SPEC")
        return
    if out.is_dir() and any(out.iterdir()):
        if (out / "records").is_dir() or (out / "images").is_dir():
            raise SpecError(f"output {str(out)!r}: holds sweep results without spec.json; use another output folder")
    atomic_write_text(marker, json.dumps(mine, indent=2, sort_keys=True))
