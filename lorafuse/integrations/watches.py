"""What an installation changes outside the patched layers, because of diffusers / PEFT features,
and undoes on removal:

- a watch on the pipeline's ``load_lora_weights``: a hotswap of one of the two adapters re-prepares
  the method, the packed factors and the merged weights;
- watches on the offloading / casting methods of the pipeline and its denoisers: "inplace" hands
  every original weight back before they copy the weights (see :mod:`.offload`);
- the text encoders' LoRA scalings under constant-gate methods (merge, subject, style), weighted as
  ``set_adapters([subject, style], [w_c, w_s])`` would.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from ..fusion import ConstantGates
from .discovery import _peft_classes, _unwrap
from .offload import unwatch, watch_offload

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class Watches:
    """The watches and text-encoder weights of one installation; :meth:`remove` undoes them (a
    method or scaling someone changed since is left alone)."""

    def __init__(self):
        self.reload: tuple[Any, Any] | None = None  # (pipe, our load_lora_weights)
        self.offload: list = []  # (pipeline or denoiser, method name, our wrapper)
        self.text_encoders: list[tuple[Any, str, Any, Any]] = []  # (text-encoder layer, adapter, saved, ours)

    def watch_reloads(self, h, pipe) -> None:
        """``pipe.load_lora_weights(..., adapter_name=<subject or style>, hotswap=True)`` copies new
        factors into the adapter's tensors in place (invisible to version counters): re-prepare the
        method, the packed factors and the merged weights right after it."""
        ref = weakref.ref(h)
        cls_load = type(pipe).load_lora_weights

        def load_lora_weights(*args, **kwargs):
            out = cls_load(pipe, *args, **kwargs)
            name = kwargs.get("adapter_name", args[1] if len(args) > 1 else None)
            h = ref()
            if h is not None and not h._removed and name in (h.subject, h.style):
                h._prepare_method()
                h._coverage.rescore(h.method, (h.subject, h.style))
            return out

        self.reload = (pipe, load_lora_weights)
        pipe.load_lora_weights = load_lora_weights

    def watch_offload(self, h, pipe, denoisers) -> None:
        """Before offloading is enabled on the pipeline or a denoiser (it copies the weights as they
        are), in place mode hands every original weight back; the next call merges again."""
        ref = weakref.ref(h)

        def hand_back() -> None:
            h = ref()
            if h is not None and not h._removed:
                for rec in h._layers:
                    h._hand_back(rec)

        objects = ([] if isinstance(pipe, nn.Module) else [pipe]) + [_unwrap(d) for _, d in denoisers]
        self.offload = watch_offload(objects, hand_back)

    def weight_text_encoders(self, method, names: tuple[str, str], pipe) -> None:
        """Constant-gate methods (merge, subject, style) weight the text encoders' LoRAs too, as
        ``set_adapters([subject, style], [w_c, w_s])`` does: each text-encoder LoRA layer's scaling of
        adapter i is multiplied by w_i. The selecting methods leave the text encoders as loaded: they
        run once per prompt, and the methods decide per denoiser layer."""
        if not isinstance(method, ConstantGates):
            return
        LoraLayer = _peft_classes()
        weights = dict(zip(names, method._weights))
        for name in TEXT_ENCODERS:
            te = getattr(pipe, name, None)
            if not isinstance(te, nn.Module):
                continue
            for _, m in te.named_modules():
                if not isinstance(m, LoraLayer):
                    continue
                for a, w in weights.items():
                    if a in m.scaling and w != 1.0:
                        saved = m.scaling[a]
                        m.scaling[a] = saved * w
                        self.text_encoders.append((m, a, saved, m.scaling[a]))

    def remove_watches(self) -> None:
        """The reload and offload watches (first in removal: nothing re-installs afterwards)."""
        if self.offload:
            unwatch(self.offload)
        if self.reload is not None:
            pipe, fn = self.reload
            if pipe.__dict__.get("load_lora_weights") is fn:
                del pipe.__dict__["load_lora_weights"]
            self.reload = None

    def restore_text_encoders(self) -> None:
        for m, a, saved, ours in self.text_encoders:
            if m.scaling.get(a) == ours:  # not changed since (set_adapters would have reset it)
                m.scaling[a] = saved
        self.text_encoders.clear()
