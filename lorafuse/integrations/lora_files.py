"""LoRA files for downstream libraries: read a subject and a style LoRA without a pipeline.

``load_lora_pair(subject_file, style_file)`` returns, for each file, ``{module path: (A, B, scale)}``
keyed by the denoiser's diffusers module path (``down_blocks.1.attentions.0...attn1.to_q``), with
A (r, in), B (out, r) and ``scale = alpha / r`` (1.0 without an alpha): the delta the file means is
``scale * B @ A``. Key formats are converted by diffusers' own converters (the family's
``LoraLoaderMixin.lora_state_dict`` and ``convert_unet_state_dict_to_peft``), not re-implemented:
diffusers/PEFT keys (with or without the ``unet.``/``transformer.`` prefix), old attention-processor
keys, kohya ``lora_unet_*`` keys with ``.alpha`` (SDXL's SGM block names need the UNet config), and
FLUX kohya keys. Text-encoder keys are dropped: they run once per prompt, on PEFT. Conv LoRAs (4-D
kernels, e.g. SD1.5's 1x1 ``proj_in``/``proj_out``) are skipped: only linears are fused.

Bad files get a ValueError naming the file (and the key): missing, not safetensors, corrupt header,
no LoRA keys of a known format, NaN/inf weights, A/B shapes that disagree, DoRA / LoRA-bias keys.
"""

from __future__ import annotations

import math
import os
import re
import types
import warnings
from typing import Any, NamedTuple, Sequence

import torch

# one layer's LoRA: A (r, in), B (out, r) and scale = alpha / r: the delta is scale * B @ A
LoRATriple = tuple[torch.Tensor, torch.Tensor, float]

FAMILIES = ("sd", "sdxl", "sd3", "flux")
_DENOISER_PREFIX = {"sd": "unet.", "sdxl": "unet.", "sd3": "transformer.", "flux": "transformer."}
# component prefixes of a pipeline-level file; a diffusers/PEFT file with none of them is a model-level
# file (what ``model.load_lora_adapter(file, prefix=None)`` loads): all its keys are the denoiser's
_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")
_DIT_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


class LoRAPair(NamedTuple):
    """``subject`` and ``style``: {diffusers module path: (A, B, scale)} of the denoiser."""

    subject: dict[str, LoRATriple]
    style: dict[str, LoRATriple]

    def common(self) -> list[str]:
        """Module paths both LoRAs target, in the subject file's order."""
        return [path for path in self.subject if path in self.style]


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with errors that name the file (and the key)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"LoRA file {path!r} does not exist" + (" (it is a directory)" if os.path.isdir(path) else ""))
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"LoRA file {path!r} is not a readable safetensors file: {exc}") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"LoRA file {path!r}: tensor {key!r} contains NaN or inf")
    return tensors


def detect_format(keys, path: str = "<dict>") -> str:
    """'kohya', 'kohya-flux', 'peft' (diffusers/PEFT ``lora_A/lora_B``) or 'attn-procs' (old diffusers)."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks")) for k in keys):
        return "kohya-flux"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "attn-procs"
    example = keys[0] if keys else "(no keys)"
    raise ValueError(
        f"LoRA file {path!r}: keys of no known LoRA format (diffusers/PEFT lora_A/lora_B, kohya "
        f"lora_unet_*.lora_down/lora_up, diffusers attention processors), e.g. {example!r}"
    )


def guess_family(fmt: str, keys, family: str | None = None) -> str:
    """The model family ("sd", "sdxl", "sd3", "flux") of a file's keys in format ``fmt``; ``family``,
    when given, is checked and returned. SD3 is never guessed (its keys look like FLUX's): pass it."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"load_lora_pair: family must be one of {FAMILIES}, got {family!r}")
        return family
    if fmt == "kohya-flux":
        return "flux"
    if any(k.startswith("lora_unet_input_blocks") or k.startswith("lora_te2_") for k in keys):
        return "sdxl"
    if any(k.startswith("transformer.") for k in keys):
        return "flux"
    if _unprefixed(fmt, keys) and any(k.startswith(_DIT_BLOCKS) for k in keys):
        return "flux"
    return "sd"


def _unprefixed(fmt: str, keys) -> bool:
    """A model-level diffusers/PEFT file: no key names a pipeline component."""
    return fmt in ("peft", "attn-procs") and not any(k.startswith(_COMPONENTS) for k in keys)


def _loader(family: str):
    from diffusers.loaders import lora_pipeline as lp

    return {
        "sd": lp.StableDiffusionLoraLoaderMixin,
        "sdxl": lp.StableDiffusionXLLoraLoaderMixin,
        "sd3": lp.SD3LoraLoaderMixin,
        "flux": lp.FluxLoraLoaderMixin,
    }[family]


def _alpha_module(key: str) -> str:
    """The PEFT module path an alpha key of diffusers' converters names: the kohya / attention-processor
    name of the down weight (``...attn1.processor.to_k_lora.down.weight[.alpha]``) or a module path."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted = next(iter(convert_unet_state_dict_to_peft({key.removesuffix(".alpha"): None})))
    return converted.split(".lora_A")[0].removesuffix(".weight")


class LoRAFile(NamedTuple):
    """One file read by :func:`read_lora_file`: its denoiser ``layers`` {module path: (A, B, scale)},
    key ``format`` (:func:`detect_format`), model ``family`` and the number of tensors in it."""

    layers: dict[str, LoRATriple]
    format: str
    family: str
    num_tensors: int


def load_lora_layers(
    path: str | os.PathLike, *, family: str | None = None, unet_config: dict | None = None
) -> dict[str, LoRATriple]:
    """One LoRA file -> {denoiser module path: (A, B, scale)} (see the module docstring)."""
    return read_lora_file(path, family=family, unet_config=unet_config).layers


def read_lora_file(path: str | os.PathLike, *, family: str | None = None, unet_config: dict | None = None) -> LoRAFile:
    """:func:`load_lora_layers` plus what was found on the way (format, family, tensor count)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    path = os.fspath(path)
    tensors = read_safetensors(path)
    num_tensors = len(tensors)
    fmt = detect_format(tensors, path)
    family = guess_family(fmt, tensors, family)
    if _unprefixed(fmt, tensors):
        tensors = {_DENOISER_PREFIX[family] + k: v for k, v in tensors.items()}
    kwargs = {}
    if family in ("sd", "sdxl") and unet_config is not None:
        # diffusers reads ``unet_config.layers_per_block``: accept a plain dict (``dict(unet.config)``) too
        if not hasattr(unet_config, "layers_per_block"):
            unet_config = types.SimpleNamespace(**dict(unet_config))
        kwargs["unet_config"] = unet_config
    sgm = any(k.startswith("lora_unet_") and p in k for k in tensors for p in _SGM_BLOCKS)
    if fmt == "kohya" and unet_config is None and sgm:
        raise ValueError(f"LoRA file {path!r}: SDXL kohya keys (SGM block names) need unet_config=pipe.unet.config")
    try:
        out = _loader(family).lora_state_dict(dict(tensors), **kwargs)
    except Exception as exc:  # diffusers' converters raise many types (bare asserts too); name the file
        raise ValueError(
            f"LoRA file {path!r}: diffusers could not convert it as a {family} LoRA: {type(exc).__name__}: {exc}"
        ) from None
    state, alphas = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    prefix = _DENOISER_PREFIX[family]
    alphas = alphas or {}
    # alphas are keyed by the down weight's (pre-PEFT) name + ".alpha", or "<module>.alpha"
    rename = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
    peft_state = convert_unet_state_dict_to_peft({k: state[full] for k, full in rename.items()})
    alpha_of = {}
    for key, value in alphas.items():
        if key.startswith(prefix):
            alpha_of[_alpha_module(key[len(prefix):])] = float(value)
    for key, value in tensors.items():  # plain diffusers files may carry "<module>.alpha" tensors
        if key.startswith(prefix) and key.endswith(".alpha") and value.numel() == 1:
            alpha_of.setdefault(key[len(prefix):].removesuffix(".alpha"), float(value))

    for key in peft_state:
        if ".lora_magnitude_vector" in key or ".lora_B.bias" in key:
            raise ValueError(
                f"LoRA file {path!r}: key {prefix + key!r} is a DoRA magnitude or LoRA bias, "
                "which fusion does not support"
            )
        if key.endswith(".lora_B.weight") and key.replace(".lora_B.weight", ".lora_A.weight") not in peft_state:
            module = key[: -len(".lora_B.weight")]
            raise ValueError(f"LoRA file {path!r}: {module!r} has an up (B) matrix but no down (A) matrix")

    layers: dict[str, LoRATriple] = {}
    for key, A in peft_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        B = peft_state.get(f"{module}.lora_B.weight")
        if B is None:
            raise ValueError(f"LoRA file {path!r}: {module!r} has a down (A) matrix but no up (B) matrix")
        if A.dim() == 4 and B.dim() == 4:  # a conv LoRA (kohya proj_in/proj_out 1x1, resnet 3x3): not a linear
            continue
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"LoRA file {path!r}: {module!r} has A {tuple(A.shape)} and B {tuple(B.shape)}; expected (r, in) and (out, r)"
            )
        rank = A.shape[0]
        alpha = alpha_of.get(module)
        scale = 1.0 if alpha is None else alpha / rank
        if not math.isfinite(scale):
            raise ValueError(f"LoRA file {path!r}: {module!r} has a non-finite alpha")
        layers[module] = (A, B, scale)
    if not layers:
        raise ValueError(f"LoRA file {path!r}: no {family} denoiser linear layers (keys under {prefix!r}) in it")
    return LoRAFile(layers, fmt, family, num_tensors)


def load_lora_pair(
    subject_file: str | os.PathLike,
    style_file: str | os.PathLike,
    *,
    family: str | None = None,
    unet_config: dict[str, Any] | None = None,
) -> LoRAPair:
    """Read a subject and a style LoRA: ``LoRAPair(subject={path: (A, B, scale)}, style={...})``.

    ``family`` ("sd", "sdxl", "sd3", "flux") is guessed from the keys when None. Raises ValueError
    (naming the file) for bad files and when the two LoRAs target no common layer.
    """
    pair = LoRAPair(
        load_lora_layers(subject_file, family=family, unet_config=unet_config),
        load_lora_layers(style_file, family=family, unet_config=unet_config),
    )
    if not pair.common():
        raise ValueError(
            f"LoRA files {os.fspath(subject_file)!r} and {os.fspath(style_file)!r} target no common layer "
            f"(e.g. {next(iter(pair.subject))!r} vs {next(iter(pair.style))!r})"
        )
    return pair


def check_against_model(layers: dict[str, LoRATriple], model: torch.nn.Module, path: str = "<LoRA>") -> None:
    """Every layer must exist in ``model`` as a linear with matching in/out features (all or nothing)."""
    if not layers:
        raise ValueError(f"LoRA {path!r} has no layers")
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if len(missing) == len(layers):
        raise ValueError(f"LoRA {path!r} targets none of the model's layers (e.g. {missing[0]!r})")
    for name, (A, B, _) in layers.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"LoRA {path!r}: layer {name!r} is not in the model")
        base = getattr(mod, "base_layer", mod)
        weight = getattr(base, "weight", None)
        if weight is None or weight.dim() != 2 or tuple(weight.shape) != (B.shape[0], A.shape[1]):
            shape = tuple(weight.shape) if weight is not None else None
            raise ValueError(
                f"LoRA {path!r}: layer {name!r} has weight {shape}, the LoRA needs ({B.shape[0]}, {A.shape[1]})"
            )


# ------------------------------------------------------------------------------------------------
# per-layer alphas that diffusers / PEFT lost when loading a file into a pipeline


class AlphaMismatch(NamedTuple):
    """One PEFT LoRA layer whose alpha is not the one its file gave it: ``path`` in the model, the
    adapter's ``rank`` there, the file's alpha (``expected_alpha``) and the one PEFT applies
    (``loaded_alpha``); the scales are alpha / r (alpha / sqrt(r) with rsLoRA)."""

    path: str
    rank: int
    expected_alpha: float
    loaded_alpha: float
    expected_scale: float
    loaded_scale: float


class LoRAAlphaWarning(UserWarning):
    """diffusers / PEFT loaded an adapter with other per-layer scales than its file holds."""


def peft_alpha_mismatches(model: torch.nn.Module, adapter: str) -> list[AlphaMismatch]:
    """The LoRA layers of ``model`` (a denoiser or text encoder loaded by diffusers) whose alpha for
    ``adapter`` differs from the file's per-layer alpha.

    diffusers hands a file's per-layer alphas to PEFT as ``peft_config[adapter].alpha_pattern``
    (every alpha but the most common one, which becomes ``lora_alpha``). For kohya files (SD1.5 and
    SDXL ``lora_unet_*`` keys, diffusers 0.42) the pattern keys keep the attention-processor name of
    the down weight (``...attn1.processor.to_k_lora.down.weight``), which matches no module: PEFT
    ignores them (one RuntimeWarning at load) and gives those layers the most common alpha. Here each
    pattern key PEFT matched no module with is converted to its module path exactly as
    :func:`read_lora_file` (and so ``lorafuse inspect``) converts it, and that layer's alpha in PEFT
    (``lora_alpha[adapter]``, which ``set_adapters`` weights do not change) is compared with it.
    Empty when the config has no pattern (all layers share one alpha) or PEFT applied all of it."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    cfg = (getattr(model, "peft_config", None) or {}).get(adapter)
    pattern = dict(getattr(cfg, "alpha_pattern", None) or {})
    if not pattern:
        return []
    layers = {path: m for path, m in model.named_modules()
              if adapter in (getattr(m, "lora_alpha", None) or {}) and adapter in (getattr(m, "r", None) or {})}
    ignored = dict(pattern)
    rules = [(key, re.compile(rf"(.*\.)?({key})$")) for key in pattern]  # PEFT's get_pattern_key rule
    for path in layers:
        for key, rule in rules:
            if key in ignored and rule.match(path):
                del ignored[key]
    out = []
    seen = set()
    for key, alpha in ignored.items():
        try:
            path = _alpha_module(key)
        except Exception:  # noqa: BLE001 - a key diffusers' converter cannot read: nothing to compare with
            continue
        m = layers.get(path)
        if m is None or path in seen:
            continue
        seen.add(path)
        rank, loaded = int(m.r[adapter]), float(m.lora_alpha[adapter])
        if float(alpha) == loaded:
            continue
        div = math.sqrt(rank) if (getattr(m, "use_rslora", None) or {}).get(adapter, False) else rank
        out.append(AlphaMismatch(path, rank, float(alpha), loaded, float(alpha) / div, loaded / div))
    return out


def _lora_models(pipe) -> list[tuple[str, torch.nn.Module]]:
    """(component name, module) of a pipeline's components that carry PEFT adapters, or the module."""
    if isinstance(pipe, torch.nn.Module):
        return [(type(pipe).__name__, pipe)]
    names = ("unet", "transformer", "transformer_2", "prior", "decoder", "text_encoder", "text_encoder_2",
             "text_encoder_3")
    return [(n, m) for n in names if isinstance(m := getattr(pipe, n, None), torch.nn.Module)
            and getattr(getattr(m, "_orig_mod", m), "peft_config", None)]


def _mismatches(pipe, adapters):
    for comp, model in _lora_models(pipe):
        model = getattr(model, "_orig_mod", model)
        loaded = getattr(model, "peft_config", None) or {}
        for adapter in (loaded if adapters is None else [a for a in adapters if a in loaded]):
            if found := peft_alpha_mismatches(model, adapter):
                yield comp, model, adapter, found


def pipeline_alpha_mismatches(
    pipe: Any, adapters: Sequence[str] | None = None
) -> dict[tuple[str, str], list[AlphaMismatch]]:
    """{(component, adapter): :func:`peft_alpha_mismatches`} over a pipeline's components (or one
    module), for ``adapters`` (default: every adapter loaded); only non-empty lists."""
    return {(comp, adapter): found for comp, _, adapter, found in _mismatches(pipe, adapters)}


def warn_alpha_mismatches(pipe: Any, adapters: Sequence[str] | None = None, stacklevel: int = 3) -> int:
    """One :class:`LoRAAlphaWarning` per (component, adapter) of :func:`pipeline_alpha_mismatches`,
    naming the adapter, the number of layers and one example; returns the number of layers."""
    total = 0
    for comp, model, adapter, found in _mismatches(pipe, adapters):
        n_layers = sum(adapter in (getattr(m, "lora_alpha", None) or {}) for m in model.modules())
        e = found[0]
        total += len(found)
        warnings.warn(
            f"lorafuse: adapter {adapter!r} was loaded with the wrong LoRA scale on {len(found)} of {n_layers} "
            f"{comp} layers (e.g. {e.path}: the file's alpha {e.expected_alpha:g} / r {e.rank} = scale "
            f"{e.expected_scale:g}, PEFT applies {e.loaded_scale:g}): diffusers passed the file's per-layer alphas "
            "with keys PEFT matched to no module, so the run differs from the file (and from `lorafuse inspect`). "
            "Fix: lorafuse.integrations.fix_peft_alphas(pipe) after load_lora_weights (or read the file with "
            "lorafuse.integrations.load_lora_pair, which applies per-layer alphas)",
            LoRAAlphaWarning, stacklevel=stacklevel,
        )
    return total


def fix_peft_alphas(pipe: Any, adapters: Sequence[str] | None = None) -> int:
    """Give every layer :func:`pipeline_alpha_mismatches` finds its file's alpha: ``lora_alpha[adapter]``
    is set (``set_adapters`` recomputes the scaling from it) and ``scaling[adapter]`` is multiplied by
    expected / loaded alpha (keeping a ``set_adapters`` weight already applied). Returns the number of
    layers changed; a second call changes none. ``pipe``: a pipeline or one model (denoiser)."""
    fixed = 0
    for _, model, adapter, found in list(_mismatches(pipe, adapters)):
        modules = dict(model.named_modules())
        for e in found:
            m = modules[e.path]
            m.lora_alpha[adapter] = e.expected_alpha
            if e.loaded_alpha != 0:
                m.scaling[adapter] = m.scaling[adapter] * (e.expected_alpha / e.loaded_alpha)
            else:
                m.scaling[adapter] = e.expected_scale
            fixed += 1
    return fixed
