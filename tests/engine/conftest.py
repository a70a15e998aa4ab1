"""The engine's tests need neither diffusers nor PEFT. With ``LORAFUSE_BLOCK_IMPORTS=diffusers,peft``
in the environment (``test_blocked.py`` runs this folder so in a subprocess), importing either raises
ImportError, before anything of lorafuse is imported."""

from __future__ import annotations

import importlib.abc
import os
import sys

BLOCKED = tuple(n for n in os.environ.get("LORAFUSE_BLOCK_IMPORTS", "").split(",") if n)


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked for the engine tests (LORAFUSE_BLOCK_IMPORTS)")
        return None


if BLOCKED:
    already = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    if already:
        raise RuntimeError(f"cannot block {BLOCKED}: already imported ({already[:3]})")
    sys.meta_path.insert(0, _Blocker())
