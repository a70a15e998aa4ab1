"""Scores of generated images, in batches, with the :mod:`lorafuse.guidance` scorers.

    subject_dino = mean_j cos(DINO(image), DINO(subject reference j))     subject fidelity
    style_clip   = mean_j cos(CLIP_img(image), CLIP_img(style reference j)) style fidelity
    text_clip    = cos(CLIP_img(image), CLIP_txt(prompt))                    text alignment

The text-alignment prompt is the item's template with the LoRAs' ``text`` (default: the trigger
words). CLIP's text tower and tokenizer come from the same folder as the image tower
(``CLIPTextModelWithProjection``, a full ``CLIPModel`` save has both); a folder without them skips
text alignment with a note. A score whose scorer or references are missing is None.

Each scored item appends ``{"key", "scoring", "subject_dino", "style_clip", "text_clip"}`` to
``scores/rank<R>.jsonl``; ``scoring`` is :meth:`Spec.scoring_id` (scorers and reference files), so
changing scorers in a SPEC rescores the finished images instead of mixing scores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .items import append_line, read_lines
from .spec import Spec, render

SCORES = ("subject_dino", "style_clip", "text_clip")


def _load_image(path: str) -> torch.Tensor:
    from PIL import Image

    from ..guidance.scorers import check_images

    with Image.open(path) as im:
        return check_images(im.convert("RGB"), path)[0]


class Scorers:
    """The SPEC's scorers on one device, with reference embeddings cached."""

    def __init__(self, clip=None, clip_text=None, dino=None, notes=()):
        self.clip, self.clip_text, self.dino = clip, clip_text, dino  # clip_text: (model, tokenizer) or None
        self.notes = list(notes)
        self._refs: dict[tuple[str, str], torch.Tensor] = {}
        self._texts: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, spec: Spec, device) -> "Scorers":
        from ..guidance.scorers import CLIPScorer, DINOScorer

        clip = clip_text = dino = None
        notes = []
        where = spec.scorers.get("clip")
        if where == "lorafuse:tiny-clip":
            clip = CLIPScorer.tiny()
            clip_text = _tiny_clip_text(clip)
        elif where:
            clip = CLIPScorer.from_pretrained(where)
            try:
                from transformers import AutoTokenizer, CLIPTextModelWithProjection

                clip_text = (CLIPTextModelWithProjection.from_pretrained(where, local_files_only=True).eval(),
                             AutoTokenizer.from_pretrained(where, local_files_only=True))
            except (OSError, ValueError) as e:
                notes.append(f"text alignment skipped: {where} has no CLIP text tower/tokenizer ({type(e).__name__})")
        where = spec.scorers.get("dino")
        if where == "lorafuse:tiny-dino":
            dino = DINOScorer.tiny()
        elif where:
            dino = DINOScorer.from_pretrained(where)
        for m in (clip, dino):
            if m is not None:
                m.to(device)
        if clip_text is not None:
            clip_text[0].to(device)
        return cls(clip, clip_text, dino, notes)

    def _embed(self, scorer, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            e = scorer(images.to(scorer.device, scorer.dtype)).float()
        return torch.nn.functional.normalize(e, dim=-1)

    def references(self, kind: str, files) -> torch.Tensor | None:
        scorer = self.clip if kind == "clip" else self.dino
        if scorer is None or not files:
            return None
        out = []
        for f in files:  # one at a time: references may have different sizes
            if (kind, f) not in self._refs:
                self._refs[(kind, f)] = self._embed(scorer, _load_image(f)[None])[0]
            out.append(self._refs[(kind, f)])
        return torch.stack(out)

    def text(self, prompts: list[str]) -> torch.Tensor | None:
        if self.clip_text is None:
            return None
        model, tok = self.clip_text
        new = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if new:
            enc = tok(new, padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                emb = model(**{k: v.to(model.device) for k, v in enc.items()}).text_embeds.float()
            for p, e in zip(new, torch.nn.functional.normalize(emb, dim=-1)):
                self._texts[p] = e
        return torch.stack([self._texts[p] for p in prompts])


def _tiny_clip_text(clip):
    """A random-init CLIP text tower matching :meth:`CLIPScorer.tiny`'s projection width (tests)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ..integrations.tiny import tiny_clip_tokenizer

    dim = clip.model.config.projection_dim
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = CLIPTextModelWithProjection(cfg).eval()
    return model, tiny_clip_tokenizer()


def score_records(spec: Spec, out: Path, records: list[dict], scorers: Scorers, rank: int) -> list[dict]:
    """Score finished items (their "ok" records) in one batch and append one line each."""
    if not records:
        return []
    images = torch.stack([_load_image(str(out / r["image"])) for r in records])
    by_name_c = {s.name: s for s in spec.subjects}
    by_name_s = {s.name: s for s in spec.styles}
    emb_clip = scorers._embed(scorers.clip, images) if scorers.clip is not None else None
    emb_dino = scorers._embed(scorers.dino, images) if scorers.dino is not None else None
    texts = None
    if emb_clip is not None:
        texts = scorers.text([render(spec.prompts[r["prompt_index"]], by_name_c[r["subject"]], by_name_s[r["style"]],
                                     for_scoring=True) for r in records])
    sid = spec.scoring_id()
    lines = []
    for i, r in enumerate(records):
        line = {"key": r["key"], "scoring": sid, "subject_dino": None, "style_clip": None, "text_clip": None}
        refs = scorers.references("dino", by_name_c[r["subject"]].references) if emb_dino is not None else None
        if refs is not None:
            line["subject_dino"] = float((refs @ emb_dino[i]).mean())
        refs = scorers.references("clip", by_name_s[r["style"]].references) if emb_clip is not None else None
        if refs is not None:
            line["style_clip"] = float((refs @ emb_clip[i]).mean())
        if texts is not None:
            line["text_clip"] = float(texts[i] @ emb_clip[i])
        append_line(out / "scores" / f"rank{rank}.jsonl", line)
        lines.append(line)
    return lines


def scored_keys(spec: Spec, out: Path) -> dict[str, dict]:
    """key -> score line of the current scoring id (the last one wins)."""
    sid = spec.scoring_id()
    return {r["key"]: r for r in read_lines(out / "scores") if r.get("scoring") == sid}


def skipped_notes(spec: Spec) -> list[str]:
    """What is not scored, and why (for the summary)."""
    notes = []
    if not spec.scorers.get("clip") and not spec.scorers.get("dino"):
        return ["scoring skipped: the SPEC names no scorer (scorers.clip / scorers.dino: local folders)"]
    if not spec.scorers.get("dino"):
        notes.append("subject fidelity skipped: no scorers.dino")
    elif not all(s.references for s in spec.subjects):
        miss = [s.name for s in spec.subjects if not s.references]
        notes.append(f"subject fidelity skipped for {', '.join(miss)}: no references folder")
    if not spec.scorers.get("clip"):
        notes.append("style fidelity and text alignment skipped: no scorers.clip")
    elif not all(s.references for s in spec.styles):
        miss = [s.name for s in spec.styles if not s.references]
        notes.append(f"style fidelity skipped for {', '.join(miss)}: no reference image")
    return notes
