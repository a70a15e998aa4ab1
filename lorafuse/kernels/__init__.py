"""Triton kernels, each beside its plain-torch reference (same signature; the reference is the CPU
path). Data flows one way: integrations -> fusion -> kernels; nothing here knows diffusers.

- :func:`fused_lora_linear` -- ``y = x W^T + b + sum_i g_i s_i (x A_i^T) B_i^T`` (+ statistics)
- :class:`PackedLoRA`       -- a layer's LoRAs packed once (concatenated, rank-padded, scale-folded)
- :func:`fused_lora_forward`, :func:`lora_shrink`, :func:`reduce_lora_stats`, :func:`lora_fixup`
- :func:`kl_decide` -- statistics partials -> per-sample KL gates in one kernel (in place, no sync)
- :func:`kl_select` -- one KL-selected layer call (Triton: 4 launches; torch: a compact fp32 sequence)
"""

from .api import FusedForward, fused_lora_forward, fused_lora_linear, lora_fixup, lora_shrink
from .kl_decide import kl_decide, kl_select
from .lora_stats import LoRAStats, reduce_lora_stats
from .packing import PackedLoRA

__all__ = [
    "FusedForward",
    "LoRAStats",
    "PackedLoRA",
    "fused_lora_forward",
    "fused_lora_linear",
    "kl_decide",
    "kl_select",
    "lora_fixup",
    "lora_shrink",
    "reduce_lora_stats",
]
