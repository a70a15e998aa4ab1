"""One patched PEFT ``lora.Linear`` as the engine sees it, and the check of its live PEFT state.

:class:`PeftLayer` is the engine's :class:`~lorafuse.engine.runtime.LayerSlot` for a PEFT layer of
the two fused adapters (subject ``c``, style ``s``): its merged-weight inputs and packed factors read
the layer's live factors and ``scaling`` (which diffusers mutates for a per-call ``scale``).
:func:`fallback_reason` says why a call cannot take the merged / fused path (None: it can);
:meth:`PeftLayer.fingerprint` is the cheap per-call key that lets a call skip that check when
nothing it depends on changed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..engine import LayerSlot
from ..kernels import PackedLoRA
from .compat import lora_variants
from .offload import group_offloaded, has_own_offload_hook
from .peft_state import _casts_to, _compile_key, _real_weight, _scale_key, _scales_key, _weight_key

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# fallback reasons where the user's own PEFT state decides what the layer computes: PEFT's forward as
# it is (every other fallback runs PEFT's forward driven with the method's gates for that call)
DISABLED = "adapters disabled"
MERGED = "adapters merged"  # pipe.fuse_lora() after accelerate_fusion: PEFT's merged sum, warned once
MIXED_BATCH = "adapter_names= (mixed-batch) call"
NOT_STARTED = "called outside a denoiser call (no timestep yet)"
DELETED = "adapter deleted from the layer"
ADAPTERS_CHANGED = "not exactly the two fused adapters active (set_adapters changed)"
USERS_CHOICE = (DISABLED, MERGED, MIXED_BATCH, NOT_STARTED, DELETED, ADAPTERS_CHANGED)
# diffusers' enable_layerwise_casting: the base weight is stored in another dtype and cast for each
# call; the fused path then runs on a cast copy (what the hook computes with), not PEFT's forward
CAST = "layerwise casting (fused path on the weight cast to the compute dtype)"
SILENT = (DISABLED,)  # the base layer is what PEFT gives: no warning
# enable_group_offload(offload_type="leaf_level"): the weights are onloaded by the forwards of the
# layer's own leaves, which only PEFT's forward calls (see integrations/offload.py)
LEAF_OFFLOAD = "weights onloaded by their own hooks (leaf-level group offloading)"


class PeftLayer(LayerSlot):
    """A patched PEFT ``lora.Linear`` ``module`` (base layer ``base``: W (N x K), bias) holding the
    adapters ``names = (subject, style)``. Besides the engine's slots it keeps what the
    installation put on the layer (``forward``, ``merge_guard``), the packs per scalings
    (``cache``; ``ccache`` for compiled graphs, by value), the factors' versions at install
    (``install_weights``, for the stale-scores warning) and its state key of the last run start
    (``state``, :meth:`state_key`). ``on_stale()`` is called once when the factors changed since."""

    __slots__ = ("module", "base", "names", "forward", "merge_guard", "cache", "ccache", "install_weights",
                 "stale_warned", "state", "on_stale", "dst_scales", "ancestors")

    def __init__(self, index: int, component: str, path: str, module: nn.Module, names: tuple[str, str],
                 on_stale: Callable[[], None] = lambda: None, ancestors: tuple[nn.Module, ...] = ()):
        super().__init__(index, component, path)
        self.module = module
        self.base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        self.names = names
        self.forward = None
        self.merge_guard = None  # in place mode: PEFT's merge() restores the original first
        self.cache: dict = {}
        self.ccache: dict = {}
        self.install_weights = None
        self.stale_warned = False
        self.state = None
        self.on_stale = on_stale
        self.dst_scales = None  # the scalings W_eff (``dst``) was built with, as a compiled graph compares them
        self.ancestors = ancestors  # the modules above the layer in its denoiser (group offloading hooks)

    # ---------------- the engine's view ----------------
    def base_weight(self) -> torch.Tensor | None:
        return self.base.weight if self.base is not None else None

    def original_weight(self) -> torch.Tensor | None:
        """Where an "inplace" original goes back: the weight, or accelerate's offloaded copy of it."""
        return _real_weight(self.base) if self.base is not None else None

    def ready(self) -> bool:
        """The full check on an input like the weight (its device and dtype): what a compiled graph's
        check of this layer passes with, so the engine merges it before the graph runs. Not for
        weights on "meta" or moved by a block's group offloading (placeholders until the block onloads
        them): such a layer merges at its own call."""
        w = self.base.weight if self.base is not None else None
        return (w is not None and not w.is_meta and not group_offloaded(self.ancestors)
                and fallback_reason(self, w, (), {}, True) is None)

    def merged_into(self, dst: torch.Tensor | None) -> None:
        self.dst = dst
        self.dst_scales = self.compiled_scales() if dst is not None else None

    def compiled_scales(self) -> tuple:
        """The live scalings of the two adapters by value (tensor scalings as one tag), as a compiled
        graph reads them: guarded by value, no version checks inside the graph."""
        sc = self.module.scaling
        s, t = self.names
        return _compile_key(sc[s]), _compile_key(sc[t])

    def merge_inputs(self):
        m = self.module
        s, t = self.names
        loras = [(m.lora_A[a].weight, m.lora_B[a].weight, m.scaling[a]) for a in (s, t)]
        return self.base.weight, loras, (_scales_key(m, s, t), self.weights_key())

    def pack(self, x: torch.Tensor) -> PackedLoRA:
        """The two LoRAs packed for ``x`` with the live scalings (cached per scalings, factors, dtype
        and device: a per-call ``scale`` alternates between a few)."""
        m = self.module
        s, t = self.names
        A_s, B_s, A_t, B_t = m.lora_A[s].weight, m.lora_B[s].weight, m.lora_A[t].weight, m.lora_B[t].weight
        sc_s, sc_t = m.scaling[s], m.scaling[t]
        key = (*_scales_key(m, s, t), self.weights_key(), x.dtype, x.device)
        packed = self.cache.get(key)
        if packed is not None:
            return packed
        self.check_stale()
        with torch.no_grad():
            packed = PackedLoRA.pack([(A_s, B_s, sc_s), (A_t, B_t, sc_t)], dtype=x.dtype, device=x.device)
        if len(self.cache) >= 4:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = packed
        if len(self.ccache) >= 4:
            self.ccache.pop(next(iter(self.ccache)))
        self.ccache[(_compile_key(sc_s), _compile_key(sc_t), x.dtype)] = packed
        return packed

    def compiled_pack(self, x: torch.Tensor) -> PackedLoRA | None:
        """Inside a compiled graph: the pack of these scalings by value (no version checks)."""
        return self.ccache.get((*self.compiled_scales(), x.dtype))

    # ---------------- keys ----------------
    def weights_versions(self) -> tuple[int, ...]:
        """Version counters of the four LoRA factors: they move with in-place writes, not with
        ``pipe.to(dtype / device)`` or offload moves (no false "weights changed" warning on those)."""
        m = self.module
        s, t = self.names
        return tuple(w._version for w in (m.lora_A[s].weight, m.lora_B[s].weight, m.lora_A[t].weight,
                                          m.lora_B[t].weight))

    def weights_key(self):
        m = self.module
        s, t = self.names
        return (_weight_key(m.lora_A[s].weight), _weight_key(m.lora_B[s].weight),
                _weight_key(m.lora_A[t].weight), _weight_key(m.lora_B[t].weight))

    def check_stale(self) -> None:
        if not self.stale_warned and self.weights_versions() != self.install_weights:
            self.stale_warned = True
            self.on_stale()

    def fingerprint(self, x: torch.Tensor):
        """What the full check (:func:`fallback_reason`) and the layer's packed / merged state depend on
        and diffusers / PEFT change between or inside denoiser calls, as a flat tuple compared by value:
        adapters disabled / merged / active, train mode, the live scalings (diffusers scales them
        inside the denoiser's forward), the base weight's identity and memory (moves, offload hooks)
        and the input dtype. When it equals the one of the last full check, the call skips both.
        The LoRA modules' identities and the factors' version counters are checked once per sampling
        run instead (:meth:`state_key`). None (autograd enabled, an adapter's scaling gone): check
        every call. Written for speed: it runs on every layer call and reads only what the layer's
        own forward touches anyway (inside a denoiser call the interpreter's caches are cold: every
        other object read costs ~0.5-1 us)."""
        if torch.is_grad_enabled():
            return None
        m = self.module
        sc = m.scaling
        try:
            c_s, c_t = sc[self.names[0]], sc[self.names[1]]
        except KeyError:
            return None
        if type(c_s) is not float or type(c_t) is not float:  # 0-d tensor scalings: by identity and version
            c_s, c_t = _scale_key(c_s), _scale_key(c_t)
        w = self.base._parameters.get("weight")
        active = m._active_adapter
        return (m._disable_adapters, len(m.merged_adapters), tuple(active) if type(active) is list else active,
                m.training, c_s, c_t, x.dtype, id(w), w.data_ptr() if w is not None else None)

    def state_key(self):
        """The rest of the layer's state the packed / merged state depend on: the identities of the
        bias and the LoRA modules, the base dtype and the LoRA factors' version counters (in-place
        writes; objects by id). None: an adapter or the weight is gone."""
        m = self.module
        s, t = self.names
        la, lb = m._modules["lora_A"]._modules, m._modules["lora_B"]._modules
        try:
            a_s, b_s, a_t, b_t = la[s], lb[s], la[t], lb[t]
        except KeyError:
            return None
        params = self.base._parameters
        w = params.get("weight")
        if w is None:
            return None
        return (w.dtype, id(params.get("bias")), id(a_s), id(b_s), id(a_t), id(b_t), *self.weights_versions())


def fallback_reason(rec: PeftLayer, x: torch.Tensor, args, kwargs, started: bool) -> str | None:
    """Why this call of ``rec``'s layer cannot take the merged / fused path (None: it can; :data:`CAST`:
    the fused path on a cast copy). Host-side checks only."""
    m = rec.module
    if args or kwargs:
        return MIXED_BATCH if "adapter_names" in kwargs else "extra forward arguments"
    if m.disable_adapters:
        return DISABLED
    if m.merged:
        return MERGED
    if not started:
        return NOT_STARTED
    s, t = rec.names
    lora_a = m.lora_A
    if s not in lora_a or t not in lora_a:
        return DELETED
    act = [a for a in m.active_adapters if a in lora_a]
    if len(act) != 2 or s not in act or t not in act:
        return ADAPTERS_CHANGED
    variants = lora_variants(m)
    if variants and (s in variants or t in variants):
        return "DoRA or another LoRA variant"
    lb = getattr(m, "lora_bias", None)
    if lb and (lb.get(s, False) or lb.get(t, False)):
        return "LoRA bias"
    base = m.get_base_layer()
    if type(base) is not nn.Linear:
        return "base layer is not a plain nn.Linear (quantized or wrapped)"
    if has_own_offload_hook(base, m.lora_A[s], m.lora_B[s], m.lora_A[t], m.lora_B[t]):
        return LEAF_OFFLOAD
    w = base.weight
    dev = x.device
    if w.device != dev:
        return "weights on meta or another device (offload)"
    if x.dtype not in KERNEL_DTYPES:
        return f"unsupported compute dtype {x.dtype}"
    cast = w.dtype != x.dtype or (base.bias is not None and base.bias.dtype != x.dtype)
    if cast and not _casts_to(base, x.dtype):
        return "storage dtype differs from compute dtype"
    A_s, B_s, A_t, B_t = m.lora_A[s].weight, m.lora_B[s].weight, m.lora_A[t].weight, m.lora_B[t].weight
    if A_s.device != dev or B_s.device != dev or A_t.device != dev or B_t.device != dev:
        return "weights on meta or another device (offload)"
    if m.training:
        for a in (s, t):
            d = m.lora_dropout[a]
            if isinstance(d, nn.Dropout) and d.p > 0:
                return "LoRA dropout in training mode"
    if torch.is_grad_enabled() and (
        x.requires_grad or A_s.requires_grad or B_s.requires_grad or A_t.requires_grad or B_t.requires_grad
        or w.requires_grad
    ):
        return "autograd enabled with trainable weights"
    return CAST if cast else None
