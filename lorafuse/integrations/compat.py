"""Compatibility with the older diffusers / PEFT / transformers releases that setup.py admits.

Every shim here is chosen by feature detection (does the attribute / argument / module exist?),
never by version strings, and names the release that introduced the feature it stands in for.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile


def clip_tokenizer(vocab: dict, merges: list, **kwargs):
    """A ``transformers.CLIPTokenizer`` from an in-memory vocab and merge list.

    transformers 5 takes ``vocab=`` / ``merges=``; transformers 4.x (what users of diffusers < 0.36 run:
    those cannot import under transformers 5) reads only ``vocab_file`` / ``merges_file``, so the two
    are written to a temporary folder first (same token ids).
    """
    from transformers import CLIPTokenizer

    params = inspect.signature(CLIPTokenizer.__init__).parameters
    if "vocab_file" not in params or "vocab" in params:
        return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:  # the first line is a header the reader skips
            f.write("#version: 0.2\n" + "".join((m if isinstance(m, str) else " ".join(m)) + "\n" for m in merges))
        return CLIPTokenizer(vocab_file=vocab_file, merges_file=merges_file, **kwargs)


def lora_variants(m):
    """The adapters of PEFT LoRA layer ``m`` that use a LoRA variant (DoRA, ...), as a container for
    ``in`` tests: PEFT's ``lora_variant`` dict (PEFT >= 0.16), else, on older PEFT, which marks DoRA
    only, the adapters whose ``use_dora`` flag is set."""
    variants = getattr(m, "lora_variant", None)
    if variants is not None:
        return variants
    return {a for a, on in (getattr(m, "use_dora", None) or {}).items() if on}


def transformers_dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` keyword for the weights' dtype in transformers: ``dtype`` since transformers 4.56
    (which keeps ``torch_dtype`` as a deprecated alias, then as a property of its configs), else
    ``torch_dtype`` (older models reject ``dtype`` in their constructor)."""
    from transformers import PretrainedConfig

    renamed = isinstance(vars(PretrainedConfig).get("torch_dtype"), property)
    return {"dtype" if renamed else "torch_dtype": dtype}


def diffusers_dtype_kwargs(dtype) -> dict:
    """``DiffusionPipeline.from_pretrained`` keyword for the dtype: newer diffusers renamed ``torch_dtype``
    to ``dtype`` (the old name warns); older releases know only ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _diffusers_model_has(name: str, arg: str | None = None) -> bool:
    from diffusers import ModelMixin

    fn = getattr(ModelMixin, name, None)
    return fn is not None and (arg is None or arg in inspect.signature(fn).parameters)


def _diffusers_hotswap() -> bool:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if "hotswap" not in inspect.signature(StableDiffusionLoraLoaderMixin.load_lora_weights).parameters:
        return False
    try:  # what diffusers calls for it (PEFT >= 0.15)
        from peft.utils.hotswap import check_hotswap_configs_compatible, prepare_model_for_compiled_hotswap  # noqa: F401
    except ImportError:
        return False
    return True


def _diffusers_pipeline_has(name: str) -> bool:
    from diffusers import DiffusionPipeline

    return hasattr(DiffusionPipeline, name)


# diffusers features lorafuse works with that the oldest admitted diffusers / PEFT lack:
# name -> (the releases that introduced it, how its presence is detected)
DIFFUSERS_FEATURES = {
    "layerwise_casting": ("diffusers >= 0.33 (ModelMixin.enable_layerwise_casting)",
                          lambda: _diffusers_model_has("enable_layerwise_casting")),
    "group_offload": ("diffusers >= 0.33 (ModelMixin.enable_group_offload)",
                      lambda: _diffusers_model_has("enable_group_offload")),
    "group_offload_to_disk": ("diffusers >= 0.34 (enable_group_offload(offload_to_disk_path=...))",
                              lambda: _diffusers_model_has("enable_group_offload", "offload_to_disk_path")),
    "pipeline_group_offload": ("diffusers >= 0.36 (DiffusionPipeline.enable_group_offload)",
                               lambda: _diffusers_pipeline_has("enable_group_offload")),
    "hotswap": ("diffusers >= 0.33 with PEFT >= 0.15 (load_lora_weights(..., hotswap=True))", _diffusers_hotswap),
    "regional_compile": ("diffusers >= 0.35 (ModelMixin.compile_repeated_blocks)",
                         lambda: _diffusers_model_has("compile_repeated_blocks")),
}


def missing_diffusers_feature(name: str) -> str | None:
    """None when the installed diffusers (and PEFT) have feature ``name`` of :data:`DIFFUSERS_FEATURES`,
    else why not: ``"<name> needs <release>"``."""
    needs, present = DIFFUSERS_FEATURES[name]
    return None if present() else f"{name} needs {needs}"
