"""The sweep SPEC: a small YAML or JSON file, read and checked before anything heavy is imported.

Schema (README "lorafuse sweep" has a complete example). Paths are relative to the SPEC's folder.

    model            str   required  local diffusers folder, hub id, or "lorafuse:tiny-sd15" /
                                     "lorafuse:small-sd15" (embedded random-init pipelines, offline)
    dtype            str             float16 | bfloat16 | float32 (default: float16 on CUDA, float32 on CPU)
    steps            int             denoising steps (default 30)
    guidance_scale   float           default: the pipeline's
    height, width    int             default: the pipeline's
    negative_prompt  str             default: none
    backend          str             auto | torch | triton (kernel backend, default auto)
    subjects         list  required  {file (required), trigger (required: replaces {subject}),
                                      name (default: file stem), text (default: trigger; replaces
                                      {subject} in the text-alignment prompt), references (folder of
                                      images: subject fidelity)}
    styles           list  required  {file (required), trigger (replaces {style}; default ""), name,
                                      text, reference (image file or folder: style fidelity)}
    prompts          list  required  templates with {subject} / {style}
    methods          list  required  "klora", "klora pattern=s", "est D=auto", "kl", "merge", ... (a
                                     name and KEY=VALUE options), or {method: NAME, options: {...},
                                     label: TEXT}; "est D=auto" runs EST's style-discrepancy probe
                                     (needs scorers.dino)
    seeds            list  required  ints, or one int n meaning 0..n-1
    scorers          map             {clip: folder, dino: folder, batch_size: 16}; "lorafuse:tiny-clip" /
                                     "lorafuse:tiny-dino" are random-init test scorers
    output           str             output folder (default: "<SPEC stem>-sweep" beside the SPEC)

Every problem raises :class:`SpecError` whose message starts with the offending key
(``subjects[1].file: no such file 'x.safetensors'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

TINY_MODELS = ("lorafuse:tiny-sd15", "lorafuse:small-sd15")
TINY_SCORERS = {"clip": "lorafuse:tiny-clip", "dino": "lorafuse:tiny-dino"}
DTYPES = ("float16", "bfloat16", "float32")
BACKENDS = ("auto", "torch", "triton")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP = ("model", "dtype", "steps", "guidance_scale", "height", "width", "negative_prompt", "backend", "subjects",
        "styles", "prompts", "methods", "seeds", "scorers", "output")
_SUBJECT_KEYS = ("name", "file", "trigger", "text", "references")
_STYLE_KEYS = ("name", "file", "trigger", "text", "reference")
# what changes the generated images: a SPEC differing here cannot reuse an output folder
GENERATION_KEYS = ("model", "dtype", "steps", "guidance_scale", "height", "width", "negative_prompt", "backend",
                   "subjects", "styles", "prompts", "methods", "seeds")


class SpecError(ValueError):
    """A bad SPEC (or an output folder that holds another SPEC's sweep); the message names the key."""


@dataclass(frozen=True)
class LoRAEntry:
    name: str
    file: str
    trigger: str
    text: str
    references: tuple[str, ...] = ()  # image files (subject: references folder; style: reference)
    sha256: str = ""


@dataclass(frozen=True)
class MethodEntry:
    label: str  # as shown in tables: "klora pattern=s"
    slug: str  # as used in file names and item keys: "klora_pattern=s"
    name: str  # fusion method name for lorafuse.fusion.get_method
    options: dict = field(default_factory=dict)  # may hold D="auto"

    @property
    def probe(self) -> bool:
        """EST with D=auto: D comes from the style-discrepancy probe per pair and prompt."""
        return self.name == "est" and self.options.get("D") == "auto"


@dataclass(frozen=True)
class Spec:
    path: str
    model: str
    dtype: str | None
    steps: int
    guidance_scale: float | None
    height: int | None
    width: int | None
    negative_prompt: str | None
    backend: str
    subjects: tuple[LoRAEntry, ...]
    styles: tuple[LoRAEntry, ...]
    prompts: tuple[str, ...]
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...]
    scorers: dict  # {"clip": str | None, "dino": str | None, "batch_size": int}
    output: str

    def generation(self) -> dict:
        """The part of the SPEC that decides the images (LoRA files by content hash), JSON-ready."""
        d = asdict(self)
        out = {k: d[k] for k in GENERATION_KEYS}
        for role in ("subjects", "styles"):
            out[role] = [{k: e[k] for k in ("name", "sha256", "trigger")} for e in d[role]]
        out["methods"] = [{"label": m["label"], "name": m["name"], "options": m["options"]} for m in d["methods"]]
        return json.loads(json.dumps(out))  # tuples as lists: comparable with a generation read back from JSON

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.generation(), sort_keys=True).encode()).hexdigest()[:16]

    def scoring_id(self) -> str:
        """Identifies what the scores depend on besides the images: scorers and reference images
        (hashed once per Spec object)."""
        cached = self.__dict__.get("_scoring_id")
        if cached is not None:
            return cached
        refs = {"subjects": {s.name: [_file_id(p) for p in s.references] for s in self.subjects},
                "styles": {s.name: [_file_id(p) for p in s.references] for s in self.styles},
                "texts": [[s.name, s.text] for s in self.subjects + self.styles],
                "clip": self.scorers.get("clip"), "dino": self.scorers.get("dino")}
        sid = hashlib.sha256(json.dumps(refs, sort_keys=True).encode()).hexdigest()[:16]
        object.__setattr__(self, "_scoring_id", sid)  # frozen dataclass: a cache, not state
        return sid

    def uses(self, role: str) -> bool:
        """Whether any method makes the subject (role "subject") or the style LoRA act."""
        other = "style" if role == "subject" else "subject"
        return any(m.name != other for m in self.methods)


def _file_id(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.basename(path)}:{st.st_size}:{_sha256(path)[:12]}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def read_spec_file(path: str | os.PathLike) -> dict:
    """The raw mapping of a YAML (.yaml/.yml) or JSON file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"SPEC {str(path)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"SPEC {str(path)!r}: not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise SpecError(f"SPEC {str(path)!r}: YAML needs PyYAML (pip install pyyaml, or the 'sweep' extra); "
                            "or write the SPEC as .json") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"SPEC {str(path)!r}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"SPEC {str(path)!r}: expected a mapping of keys (model, subjects, ...), "
                        f"got {type(raw).__name__}")
    return raw


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a SPEC; raises :class:`SpecError` naming the offending key."""
    raw = read_spec_file(path)
    return parse_spec(raw, base=Path(path).resolve().parent, path=str(path))


def _typed(raw: dict, key: str, kind, default=None, *, required=False, where: str = ""):
    name = f"{where}{key}"
    if key not in raw or raw[key] is None:
        if required:
            raise SpecError(f"{name}: missing (required)")
        return default
    v = raw[key]
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"{name}: expected an integer, got {v!r}")
    elif kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{name}: expected a number, got {v!r}")
        v = float(v)
    elif kind is str:
        if not isinstance(v, str):
            raise SpecError(f"{name}: expected a string, got {v!r}")
    elif kind is list:
        if not isinstance(v, list):
            raise SpecError(f"{name}: expected a list, got {type(v).__name__}")
    elif kind is dict:
        if not isinstance(v, dict):
            raise SpecError(f"{name}: expected a mapping, got {type(v).__name__}")
    return v


def _unknown(raw: dict, allowed, where: str) -> None:
    extra = [k for k in raw if k not in allowed]
    if extra:
        raise SpecError(f"{where}{extra[0]}: unknown key; valid keys: {', '.join(allowed)}")


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _images_in(p: Path, key: str) -> tuple[str, ...]:
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTS:
            raise SpecError(f"{key}: {str(p)!r} is not an image ({', '.join(IMAGE_EXTS)})")
        return (str(p),)
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if not found:
            raise SpecError(f"{key}: folder {str(p)!r} holds no image ({', '.join(IMAGE_EXTS)})")
        return tuple(found)
    raise SpecError(f"{key}: no such file or folder {str(p)!r}")


def _check_lora_file(p: Path, key: str) -> None:
    """Exists, is safetensors, and its keys are of a known LoRA format (header only: cheap)."""
    if not p.is_file():
        raise SpecError(f"{key}: no such file {str(p)!r}" + (" (it is a folder)" if p.is_dir() else ""))
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise SpecError(f"{key}: {str(p)!r} is not a readable safetensors file: {e}") from None
    from ..integrations.lora_files import detect_format

    try:
        detect_format(keys, str(p))
    except ValueError as e:
        raise SpecError(f"{key}: {e}") from None


def _loras(raw: dict, role: str, base: Path, check_files: bool) -> tuple[LoRAEntry, ...]:
    items = _typed(raw, role, list, required=True)
    if not items:
        raise SpecError(f"{role}: empty list (at least one {role[:-1]} LoRA)")
    allowed = _SUBJECT_KEYS if role == "subjects" else _STYLE_KEYS
    ref_key = "references" if role == "subjects" else "reference"
    out, seen = [], {}
    for i, e in enumerate(items):
        where = f"{role}[{i}]."
        if isinstance(e, str):
            e = {"file": e}
        if not isinstance(e, dict):
            raise SpecError(f"{role}[{i}]: expected a mapping with file, trigger, ...; got {e!r}")
        _unknown(e, allowed, where)
        file = _path(base, _typed(e, "file", str, required=True, where=where))
        trigger = _typed(e, "trigger", str, required=role == "subjects", where=where, default="")
        if role == "subjects" and not trigger.strip():
            raise SpecError(f"{where}trigger: empty; the subject's trigger word replaces {{subject}} in the prompts")
        name = _typed(e, "name", str, where=where, default=file.stem.split(".")[0] or f"{role[:-1]}{i}")
        if not _NAME.match(name):
            raise SpecError(f"{where}name: {name!r} must be letters, digits, '-', '_' or '.' (it names files)")
        if name in seen:
            raise SpecError(f"{where}name: {name!r} is also the name of {role}[{seen[name]}]")
        seen[name] = i
        text = _typed(e, "text", str, where=where, default=trigger)
        refs = ()
        if e.get(ref_key) is not None:
            refs = _images_in(_path(base, _typed(e, ref_key, str, where=where)), f"{where}{ref_key}")
        if check_files:
            _check_lora_file(file, f"{where}file")
        out.append(LoRAEntry(name, str(file), trigger, text, refs, _sha256(str(file)) if check_files else ""))
    return tuple(out)


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", "_".join(label.split()))


def _methods(raw: dict) -> tuple[MethodEntry, ...]:
    from ..fusion import get_method, method_options

    items = _typed(raw, "methods", list, required=True)
    if not items:
        raise SpecError("methods: empty list (e.g. [klora, kl, merge])")
    out, slugs = [], {}
    for i, m in enumerate(items):
        key = f"methods[{i}]"
        if isinstance(m, str):
            words = m.split()
            if not words:
                raise SpecError(f"{key}: empty method")
            name, options = words[0], {}
            for w in words[1:]:
                k, sep, v = w.partition("=")
                if not sep or not k:
                    raise SpecError(f"{key}: option {w!r} is not KEY=VALUE (write e.g. 'klora pattern=s')")
                options[k] = _option_value(v)
            label = " ".join(words)
        elif isinstance(m, dict):
            _unknown(m, ("method", "options", "label"), f"{key}.")
            name = _typed(m, "method", str, required=True, where=f"{key}.")
            options = dict(_typed(m, "options", dict, default={}, where=f"{key}."))
            label = _typed(m, "label", str, where=f"{key}.",
                           default=" ".join([name] + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                      for k, v in options.items()]))
        else:
            raise SpecError(f"{key}: expected a string like 'klora pattern=s' or a mapping {{method, options}}")
        try:
            valid = method_options(name)
        except ValueError as e:
            raise SpecError(f"{key}: {e}") from None
        name = name.lower()
        for k in options:
            if k not in valid:
                raise SpecError(f"{key}: unknown option {k!r} of method {name!r}; valid options: "
                                f"{', '.join(valid) or 'none'}")
        check = dict(options)
        if name == "est" and check.get("D") == "auto":
            check["D"] = 0.5  # the probe gives the value; the rest is checked now
        elif check.get("D") == "auto":
            raise SpecError(f"{key}: D=auto is EST's style-discrepancy probe; only method 'est' takes it")
        try:
            get_method(name, **check)
        except (ValueError, TypeError) as e:
            raise SpecError(f"{key}: {e}") from None
        slug = _slug(label)
        if slug in slugs:
            raise SpecError(f"{key}: {label!r} repeats methods[{slugs[slug]}] (give it another label)")
        slugs[slug] = i
        out.append(MethodEntry(label, slug, name, options))
    return tuple(out)


def _prompts(raw: dict, spec_uses_subject: bool, spec_uses_style: bool, style_triggers: bool) -> tuple[str, ...]:
    items = _typed(raw, "prompts", list, required=True)
    if not items:
        raise SpecError("prompts: empty list (e.g. ['a photo of {subject} {style}'])")
    out = []
    for i, p in enumerate(items):
        key = f"prompts[{i}]"
        if not isinstance(p, str) or not p.strip():
            raise SpecError(f"{key}: expected a non-empty string, got {p!r}")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(p) if f is not None}
        except ValueError as e:
            raise SpecError(f"{key}: {e} (write literal braces as {{{{ and }}}})") from None
        bad = sorted(fields - {"subject", "style"})
        if bad:
            raise SpecError(f"{key}: unknown placeholder {{{bad[0]}}}; only {{subject}} and {{style}} exist")
        if spec_uses_subject and "subject" not in fields:
            raise SpecError(f"{key}: no {{subject}} placeholder; the subject LoRA needs its trigger word in the prompt")
        if spec_uses_style and style_triggers and "style" not in fields:
            raise SpecError(f"{key}: no {{style}} placeholder; the style LoRAs have trigger words to put in the prompt")
        out.append(p)
    return tuple(out)


def _seeds(raw: dict) -> tuple[int, ...]:
    v = raw.get("seeds")
    if v is None:
        raise SpecError("seeds: missing (required): a list of ints, or one int n for 0..n-1")
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise SpecError(f"seeds: {v} seeds; need at least one")
        return tuple(range(v))
    if not isinstance(v, list) or not v:
        raise SpecError(f"seeds: expected a non-empty list of ints or one int, got {v!r}")
    for i, s in enumerate(v):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SpecError(f"seeds[{i}]: expected a non-negative int, got {s!r}")
    if len(set(v)) != len(v):
        raise SpecError(f"seeds: {v} repeats a seed")
    return tuple(v)


def _model(raw: dict, base: Path) -> str:
    model = _typed(raw, "model", str, required=True)
    if model.startswith("lorafuse:"):
        if model not in TINY_MODELS:
            raise SpecError(f"model: unknown embedded pipeline {model!r}; valid: {', '.join(TINY_MODELS)}")
        return model
    looks_like_path = os.path.isabs(model) or model.startswith((".", "~")) or _path(base, model).exists()
    if looks_like_path:
        p = _path(base, model)
        if not p.is_dir():
            raise SpecError(f"model: no such folder {str(p)!r}")
        if not (p / "model_index.json").is_file():
            raise SpecError(f"model: {str(p)!r} is not a diffusers pipeline folder (no model_index.json in it)")
        return str(p)
    if not re.match(r"^[\w.-]+/[\w.-]+$", model):
        raise SpecError(f"model: {model!r} is neither a folder nor a hub id (owner/name)")
    return model  # a hub id: diffusers resolves it (from its cache, or the network if the machine has one)


def _scorers(raw: dict, base: Path, probe: bool) -> dict:
    sc = _typed(raw, "scorers", dict, default={})
    _unknown(sc, ("clip", "dino", "batch_size"), "scorers.")
    out = {"clip": None, "dino": None, "batch_size": _typed(sc, "batch_size", int, 16, where="scorers.")}
    if out["batch_size"] < 1:
        raise SpecError(f"scorers.batch_size: must be at least 1, got {out['batch_size']}")
    for kind in ("clip", "dino"):
        v = _typed(sc, kind, str, where="scorers.")
        if v is None:
            continue
        if v.startswith("lorafuse:"):
            if v != TINY_SCORERS[kind]:
                raise SpecError(f"scorers.{kind}: unknown embedded scorer {v!r}; valid: {TINY_SCORERS[kind]!r}")
            out[kind] = v
            continue
        p = _path(base, v)
        if not p.is_dir():
            raise SpecError(f"scorers.{kind}: no such folder {str(p)!r} (scorers load from local folders only)")
        if not (p / "config.json").is_file():
            raise SpecError(f"scorers.{kind}: folder {str(p)!r} has no config.json")
        out[kind] = str(p)
    if probe and out["dino"] is None:
        raise SpecError("scorers.dino: missing; 'est D=auto' runs EST's style-discrepancy probe, which needs DINO")
    return out


def parse_spec(raw: dict, *, base: str | os.PathLike = ".", path: str = "<spec>", check_files: bool = True) -> Spec:
    """A checked :class:`Spec` from the raw mapping (``base``: the folder relative paths start from)."""
    base = Path(base)
    _unknown(raw, _TOP, "")
    model = _model(raw, base)
    dtype = _typed(raw, "dtype", str)
    if dtype is not None and dtype not in DTYPES:
        raise SpecError(f"dtype: {dtype!r}; valid: {', '.join(DTYPES)}")
    steps = _typed(raw, "steps", int, 30)
    if steps < 1:
        raise SpecError(f"steps: must be at least 1, got {steps}")
    guidance = _typed(raw, "guidance_scale", float)
    height, width = _typed(raw, "height", int), _typed(raw, "width", int)
    for k, v in (("height", height), ("width", width)):
        if v is not None and (v < 8 or v % 8):
            raise SpecError(f"{k}: {v} must be a positive multiple of 8")
    negative = _typed(raw, "negative_prompt", str)
    backend = _typed(raw, "backend", str, "auto")
    if backend not in BACKENDS:
        raise SpecError(f"backend: {backend!r}; valid: {', '.join(BACKENDS)}")
    methods = _methods(raw)
    subjects = _loras(raw, "subjects", base, check_files)
    styles = _loras(raw, "styles", base, check_files)
    uses_subject = any(m.name != "style" for m in methods)
    uses_style = any(m.name != "subject" for m in methods)
    prompts = _prompts(raw, uses_subject, uses_style, any(s.trigger.strip() for s in styles))
    seeds = _seeds(raw)
    scorers = _scorers(raw, base, any(m.probe for m in methods))
    output = _typed(raw, "output", str)
    output = str(_path(base, output)) if output else str(base / f"{Path(path).stem}-sweep")
    return Spec(path, model, dtype, steps, guidance, height, width, negative, backend, subjects, styles, prompts,
                methods, seeds, scorers, output)


def render(template: str, subject: LoRAEntry, style: LoRAEntry, *, for_scoring: bool = False) -> str:
    """A prompt from its template: trigger words (or the ``text`` descriptions, for scoring)."""
    s, t = (subject.text, style.text) if for_scoring else (subject.trigger, style.trigger)
    return " ".join(template.format(subject=s, style=t).split())
