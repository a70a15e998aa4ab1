"""A denoiser call's timestep as denoising progress tau in [0, 1] (0 = first, noisiest step).

    tau = clamp(1 - t0 / divisor, 0, 1),   t0 = the call's timestep (first element), in fp32

with ``divisor`` the family's normalisation (SD / SDXL: num_train_timesteps; SD3: 1000, the
transformer gets sigma * 1000; FLUX: 1, the pipeline already divides by 1000).
"""

from __future__ import annotations

import struct

import torch
from torch import nn


def _timestep_position(denoiser: nn.Module) -> int | None:
    import inspect

    try:
        params = list(inspect.signature(denoiser.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover
        return None
    for i, p in enumerate(params):
        if p.name == "timestep":
            return i
    return None


def _timestep_divisor(denoiser: nn.Module, scheduler) -> float:
    """What the denoiser's ``timestep`` must be divided by to give the noise level u in [0, 1].

    SD1.5/SDXL (UNet): t in [0, num_train_timesteps); SD3: sigma * 1000 (FlowMatch num_train_timesteps =
    1000); FLUX: the pipeline already divides by 1000, so u = t."""
    cls = type(denoiser).__name__
    if "Flux" in cls or "Chroma" in cls:
        return 1.0
    cfg = getattr(scheduler, "config", None)
    n = None
    if cfg is not None:
        n = cfg.get("num_train_timesteps", None) if hasattr(cfg, "get") else getattr(cfg, "num_train_timesteps", None)
    return float(n) if n else 1000.0


def _f32(v: float) -> float:
    """``v`` rounded to fp32 (round to nearest even), as a Python float."""
    return _F32.unpack(_F32.pack(v))[0]


_F32 = struct.Struct("f")


def _progress_of(ts, divisor: float):
    """(t0, tau) of a denoiser call's ``timestep``: t0 its first element in fp32, ``tau = clamp(1 -
    t0 / divisor, 0, 1)`` computed in fp32. A device tensor stays on the device (no host sync: two
    0-d tensors); a CPU tensor is read on the host and gives Python floats equal, bit for bit, to the
    fp32 tensor ops (double rounding of one fp32 division or subtraction through fp64 is exact), so
    the methods decide on the host without a dozen tiny aten ops per step. A Python number keeps
    fp64 arithmetic."""
    if not isinstance(ts, torch.Tensor):
        t0 = float(ts)
        return t0, min(1.0, max(0.0, 1.0 - t0 / divisor))
    if ts.device.type == "cpu" and ts.numel():
        t0 = _f32((ts if ts.numel() == 1 else ts.reshape(-1)[0]).item())
        q = _f32(1.0 - _f32(t0 / _f32(divisor)))
        return t0, (q if q != q else min(1.0, max(0.0, q)))  # NaN stays NaN, as clamp() keeps it
    t0 = ts.reshape(-1)[0].to(torch.float32) if ts.numel() else ts.new_zeros((), dtype=torch.float32)
    return t0, (1.0 - t0 / divisor).clamp(0.0, 1.0)
