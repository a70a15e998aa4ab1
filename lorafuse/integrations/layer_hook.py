"""The forward a patched PEFT ``lora.Linear`` gets: one layer call, from PEFT's state to the engine.

    forward(x):
        removed / suspended                      -> PEFT's own forward (suspended: originals back first)
        traced by torch.compile                  -> the full check as guards, then F.linear(x, W_eff, b) on the
                                                    merged path (the engine made W_eff current before the
                                                    graph ran), else the method's fused path
        fingerprint changed since the last check -> full check (peft_layer.fallback_reason):
            a reason                             -> fallbacks.fallback_forward
            none                                 -> engine.prepare_layer (merged or packed)
        engine.call: F.linear(x, W_eff, b) or method.layer_forward(l, x, W, b, packed); gate log

It is set as the layer's instance ``forward``, or innermost in diffusers' hook chain when diffusers'
hooks wrap the layer (``enable_layerwise_casting``; see ``peft_state._diffusers_slot``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .fallbacks import fallback_forward
from .peft_layer import USERS_CHOICE, PeftLayer, fallback_reason


@torch._dynamo.disable
def _pack_eager(rec: PeftLayer, x):
    return rec.pack(x)


@torch._dynamo.disable
def _fallback_eager(h, rec: PeftLayer, reason, x, args, kwargs):
    """A fallback inside a compiled graph (DoRA, offload, layerwise casting, ...): run eagerly, as
    outside one, so the result stays the method's (one graph break per such layer call)."""
    h._hand_back(rec)
    return fallback_forward(h, rec, reason, x, args, kwargs)


def _writes_weights(engine) -> bool:
    """W itself holds W_eff ("inplace" merged weights): PEFT's own forward needs the original back first."""
    return engine.merged is not None and engine.merged.mode == "inplace"


def make_layer_forward(h, rec: PeftLayer):
    """The instance forward of patched layer ``rec`` of installation ``h`` (held weakly)."""
    ref = weakref.ref(h)
    engine = h.engine
    m = rec.module
    cls_forward = type(m).forward
    index = rec.index
    params = rec.base._parameters if rec.base is not None else {}

    def forward(x, *args, **kwargs):
        h = ref()
        if h is None or h._removed:
            return cls_forward(m, x, *args, **kwargs)
        if h._suspended:
            h._hand_back(rec)
            return cls_forward(m, x, *args, **kwargs)
        if torch.compiler.is_compiling():  # traced: per-layer attributes only, so one graph serves every block
            reason = fallback_reason(rec, x, args, kwargs, engine.started)
            if reason is not None:
                if reason in USERS_CHOICE and not _writes_weights(engine):  # PEFT's forward is the result
                    return cls_forward(m, x, *args, **kwargs)
                return _fallback_eager(h, rec, reason, x, args, kwargs)  # the method's result, eagerly
            engine.traced = True  # the gate log records this call when the denoiser call ends
            rec.ran = True
            base = m.get_base_layer()
            dst = rec.dst  # W_eff, made current by the engine before the graph ran: a graph input
            if dst is not None and rec.dst_scales == rec.compiled_scales():
                return F.linear(x, dst, base.bias)
            packed = rec.compiled_pack(x)
            if packed is None:
                packed = _pack_eager(rec, x)
            rec.packed = packed  # where a dynamic method leaves the call's decision (engine.end_call)
            return h.method.layer_forward(index, x, base.weight, base.bias, packed, backend=h.backend)
        fp = rec.fingerprint(x) if not (args or kwargs) else None
        if fp is None or fp != rec.fp:  # something changed since the last full check: check again
            reason = fallback_reason(rec, x, args, kwargs, engine.started)
            if reason is not None:
                h._hand_back(rec)
                return fallback_forward(h, rec, reason, x, args, kwargs)
            rec.check_stale()
            engine.prepare_layer(rec, x)
            rec.fp = fp
        return engine.call(rec, x, params["weight"], params.get("bias"))

    return forward


def make_merge_guard(h, rec: PeftLayer):
    """``m.merge`` for "inplace" mode: PEFT's ``merge()`` (``fuse_lora``) adds its deltas to the
    original weight, not to W_eff, so the original goes back first."""
    ref = weakref.ref(h)
    m = rec.module
    cls_merge = type(m).merge

    def merge(*args, **kwargs):
        h = ref()
        if h is not None and not h._removed:
            h._hand_back(rec)
        return cls_merge(m, *args, **kwargs)

    return merge
