"""How the benchmarks ``torch.compile`` a denoiser: one helper for ``benchmarks.compiled`` and the GPU
check's compiled rows (``benchmarks.gpu_check``), so both time the same compilation paths.

- ``regional``: diffusers' regional compilation, ``model.compile_repeated_blocks(backend=...)``: every
  module whose class the model names in ``_repeated_blocks`` (the UNet's / FLUX transformer's blocks)
  is compiled in place (``nn.Module.compile``); the code between the blocks stays eager. A model that
  names no repeated blocks (or a diffusers without the method) is compiled whole, in place.
- ``whole``: ``torch.compile(model, backend=...)``, the ``OptimizedModule`` wrapper a user assigns back
  (``pipe.unet = torch.compile(pipe.unet)``); the caller puts the returned module where the model was.
"""

from __future__ import annotations

MODES = ("regional", "whole")


def compile_denoiser(model, mode: str = "regional", backend: str = "inductor"):
    """``torch.compile`` ``model`` the ``mode`` way with ``backend``; returns ``(module to call, undo)``.

    ``undo()`` drops the compiled calls (in-place compiles) and resets dynamo's caches; the wrapper of
    ``whole`` is simply no longer called once the caller restores ``model``."""
    import torch

    if mode not in MODES:
        raise ValueError(f"compile_denoiser: mode must be one of {MODES}, got {mode!r}")
    if mode == "whole":
        compiled = torch.compile(model, backend=backend)
    elif getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(backend=backend)
        compiled = model
    else:
        model.compile(backend=backend)
        compiled = model

    def undo():
        for m in model.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        torch._dynamo.reset()

    return compiled, undo
