"""Denoising progress tau and the K-LoRA / EST time-scale patterns.

tau in [0, 1]: 0 at the first (noisiest) step, -> 1 at the last.

    UNet families (SD, SDXL):   tau = 1 - t / T          (T = num_train_timesteps, 1000)
    flow models (SD3, FLUX):    tau = 1 - sigma
    official counter (K-LoRA/EST code): the l-th layer call (1-based) of denoiser call k (0-based),
        with L layer calls per denoiser call and N steps:  tau = ((k L + l) mod (L N)) / (L N)
        (the global counter n = k L + l starts at 1; the very last call wraps to tau = 0)

Patterns, alpha = 1.5 by default:

    "s":   S(tau) = alpha tau + beta                 (beta = 0.5 for K-LoRA, D for EST)
    "s*":  S(tau) = (alpha tau + beta) mod alpha     (beta = 1.275 = 0.85 alpha in the K-LoRA code)

All functions take Python floats or tensors (any device; no host sync) and return the same kind.
"""

from __future__ import annotations

import torch

PATTERNS = ("s", "s*")
DEFAULT_ALPHA = 1.5
DEFAULT_BETA = {"s": 0.5, "s*": 1.275}


def check_pattern(pattern: str, what: str) -> str:
    if pattern not in PATTERNS:
        raise ValueError(f"{what}: pattern must be one of {PATTERNS}, got {pattern!r}")
    return pattern


def time_scale(tau, pattern: str = "s", alpha: float = DEFAULT_ALPHA, beta: float | None = None):
    """S(tau) of ``pattern`` ("s": alpha tau + beta; "s*": (alpha tau + beta) mod alpha).

    ``beta`` None means the K-LoRA default of the pattern (0.5 / 1.275). ``mod`` is the floored
    remainder computed exactly (fmod, then + alpha when negative) for floats and tensors alike, so
    host and device agree to the last bit; the result lies in [0, alpha) for "s*", which therefore
    needs alpha > 0 (ValueError otherwise).
    """
    check_pattern(pattern, "time_scale")
    if pattern == "s*" and not alpha > 0:
        raise ValueError(f"time_scale: pattern 's*' takes (alpha tau + beta) mod alpha and needs alpha > 0, got {alpha!r}")
    beta = DEFAULT_BETA[pattern] if beta is None else beta
    s = alpha * tau + beta
    if pattern == "s":
        return s
    if not isinstance(s, torch.Tensor):
        return s % alpha  # Python: exact fmod, + alpha when negative
    r = torch.fmod(s, alpha)  # the same exact steps on the device (torch.remainder rounds a / alpha)
    return torch.where(r < 0, r + alpha, r)


def tau_from_timestep(t, num_train_timesteps: float = 1000.0):
    """UNet progress ``1 - t / T`` (t the discrete timestep the UNet receives)."""
    return 1.0 - t / num_train_timesteps


def tau_from_sigma(sigma):
    """Flow-matching progress ``1 - sigma`` (sigma in [0, 1], 1 = pure noise)."""
    return 1.0 - sigma


def official_tau(step: int, call: int, num_layers: int, num_steps: int) -> float:
    """The official counter's tau for the ``call``-th (1-based) layer call of denoiser call ``step``
    (0-based): ``((step * L + call) mod (L * N)) / (L * N)``. Python ints in, a float out (host only)."""
    total = num_layers * num_steps
    return ((step * num_layers + call) % total) / total


def write_tau(tau, out: torch.Tensor, what: str) -> torch.Tensor:
    """Write tau into the preallocated 0-d tensor ``out`` (fp64 on the gates' device) and return it:
    a float through ``fill_`` (a kernel argument, no copy), a tensor through ``copy_`` (on its device,
    or an asynchronous host-to-device copy); nothing reads the value on the host."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"{what}: tau must be a float or a one-element tensor, got shape {tuple(tau.shape)}")
        return out.copy_(tau.reshape(()), non_blocking=True)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{what}: tau must be a float or a tensor, got {type(tau).__name__}")
    return out.fill_(float(tau))


__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_BETA", "PATTERNS", "check_pattern", "official_tau",
    "tau_from_sigma", "tau_from_timestep", "time_scale", "write_tau",
]
