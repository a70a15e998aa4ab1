"""Cold and warm Triton caches inside one process, and what a fresh cache compiled.

A new process with an empty ``TRITON_CACHE_DIR`` compiles (and autotunes) every kernel specialisation
it launches; a new process with a filled one only loads them. :class:`cold_cache` reproduces both in a
running process: it points ``TRITON_CACHE_DIR`` at a folder (fresh: cold; reused: warm on disk) and
empties the in-memory caches of lorafuse's kernels (each ``JITFunction``'s compiled kernels, each
``Autotuner``'s chosen configs), so that the next launch behaves as in a new process. :func:`compiled`
counts what a cache folder holds: one ``.cubin`` (``.hsaco`` on ROCm) per compiled specialisation
(kernel x constexprs x argument specialisation x autotune config), and the launcher stubs (``.so``)
some Triton releases build per signature.

Works on every Triton 3.x (``device_caches`` since 3.2, ``cache`` before; the cache folder is read from
the environment at each compile); the interpreter compiles nothing and leaves the folder empty.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BINARY_SUFFIXES = (".cubin", ".hsaco")


def _triton_objects(prefix: str):
    """Every Triton kernel object (autotuner, heuristics, JIT function, interpreted function) reachable
    from module attributes of the modules ``prefix*``, each wrapper followed down its ``.fn`` chain."""
    seen = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith(prefix) or mod is None:
            continue
        for obj in list(vars(mod).values()):
            while obj is not None and type(obj).__module__.startswith("triton") and id(obj) not in seen:
                seen.add(id(obj))
                yield obj
                obj = getattr(obj, "fn", None)


def clear_memory_caches(prefix: str = "lorafuse.kernels") -> int:
    """Forget every compiled kernel and autotune choice of the kernels under ``prefix`` held in memory
    (the disk cache stays). Returns how many kernel objects had a cache to empty."""
    n = 0
    for obj in _triton_objects(prefix):
        hit = False
        for attr in ("device_caches", "cache"):  # JITFunction (3.2+ / older) and Autotuner.cache
            cache = getattr(obj, attr, None)
            if isinstance(cache, dict):
                cache.clear()
                hit = True
        n += hit
    return n


def compiled(folder: str | os.PathLike) -> dict:
    """What a Triton cache folder holds: ``kernels`` (compiled specialisations: binaries), ``by_name``
    (kernel name -> count), ``keys`` (the cache keys, i.e. sub-folders, holding a binary: equal keys in
    two folders are the same specialisation), ``launchers`` (``.so`` stubs) and ``mb`` (its size)."""
    folder = Path(folder)
    by_name: dict[str, int] = {}
    keys: set[str] = set()
    launchers, size = 0, 0
    if folder.is_dir():
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            size += path.stat().st_size
            if path.suffix in BINARY_SUFFIXES:
                by_name[path.stem] = by_name.get(path.stem, 0) + 1
                keys.add(path.parent.name)
            elif path.suffix == ".so":
                launchers += 1
    return {"kernels": sum(by_name.values()), "by_name": dict(sorted(by_name.items())), "keys": sorted(keys),
            "launchers": launchers, "mb": round(size / 2**20, 2)}


class cold_cache:
    """``with cold_cache(folder):`` run with ``TRITON_CACHE_DIR=folder`` and lorafuse's in-memory kernel
    caches emptied on entry (a fresh folder is a cold start, a used one a warm start of a new process).
    The previous ``TRITON_CACHE_DIR`` is restored on exit; what was compiled inside stays in memory."""

    def __init__(self, folder: str | os.PathLike, prefix: str = "lorafuse.kernels"):
        self.folder, self.prefix = Path(folder), prefix

    def __enter__(self) -> "cold_cache":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = str(self.folder)
        self.cleared = clear_memory_caches(self.prefix)
        return self

    def __exit__(self, *exc) -> None:
        if self.old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = self.old
