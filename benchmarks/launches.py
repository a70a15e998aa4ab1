"""Count what one call launches: Triton kernel launches plus the aten ops that launch a kernel.

A Triton launch is a ``run`` of a JIT kernel on a GPU, a grid execution under ``TRITON_INTERPRET=1``
(autotuner / heuristics wrappers end in one of them; see :func:`_launch_points`). An aten op launches a
kernel unless it only makes a view or an uninitialised allocation (``empty``, ``empty_strided``,
``new_empty``) or reads metadata. Ops the Triton interpreter itself dispatches while it runs a kernel
are not counted (on a GPU they do not exist). Custom ops (``lorafuse::*``, any namespace but aten /
prims) are containers: the dispatch mode sees the op, not the aten ops of its implementation (it runs
with the mode popped), so they count as ``custom`` and their Triton launches through the launch hook;
lorafuse's ops allocate with ``torch.empty`` only.

    with LaunchCounter() as c:
        fn()
    c.triton, c.aten, c.launches, c.names
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

# ops that neither compute nor copy: views come from func.is_view; these are the rest
NO_LAUNCH = frozenset({
    "aten.empty", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "aten.empty_like",
    "aten.detach", "aten.lift_fresh", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset",
    "aten.is_same_size", "aten.size", "aten.stride", "aten.dim",
})


def _launch_points():
    """(class, method) pairs every Triton launch goes through once: ``JITFunction.run`` on a GPU; under
    the interpreter ``GridExecutor.__call__`` (Triton <= 3.5 launches ``kernel[grid](...)`` through
    ``InterpretedFunction.__getitem__`` and keeps ``run`` as an instance attribute; newer releases
    go through ``run``; both end in one ``GridExecutor`` call)."""
    points = []
    try:
        from triton.runtime.jit import JITFunction

        points.append((JITFunction, "run"))
    except ImportError:  # pragma: no cover - no Triton
        pass
    try:
        from triton.runtime.interpreter import GridExecutor

        points.append((GridExecutor, "__call__"))
    except ImportError:  # pragma: no cover
        pass
    return points


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # a GridExecutor holds the kernel's (rewritten) function
    return getattr(fn, "__name__", type(kernel).__name__)


class LaunchCounter(TorchDispatchMode):
    """Context manager: ``triton`` kernel launches (with ``names``), ``aten`` ops that launch a kernel
    (with ``aten_names``), ``ops`` every op dispatched outside Triton launches, ``custom`` the custom
    ops among them, ``launches`` = triton + aten."""

    def __init__(self):
        super().__init__()
        self.triton = 0
        self.aten = 0
        self.ops = 0
        self.custom: list[str] = []
        self.names: list[str] = []
        self.aten_names: list[str] = []
        self._inside = 0
        self._saved = []

    @property
    def launches(self) -> int:
        return self.triton + self.aten

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside:
            self.ops += 1
            name = str(func.overloadpacket)
            if func.namespace not in ("aten", "prims"):
                self.custom.append(name)
            elif not (func.is_view or name in NO_LAUNCH):
                self.aten += 1
                self.aten_names.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self
        for cls, method in _launch_points():
            original = getattr(cls, method)

            def launch(kernel, *args, _original=original, **kwargs):
                if kwargs.get("warmup"):
                    return _original(kernel, *args, **kwargs)
                if not counter._inside:
                    counter.triton += 1
                    counter.names.append(_kernel_name(kernel))
                counter._inside += 1
                try:
                    return _original(kernel, *args, **kwargs)
                finally:
                    counter._inside -= 1

            self._saved.append((cls, method, original))
            setattr(cls, method, launch)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for cls, method, original in reversed(self._saved):
                setattr(cls, method, original)
            self._saved.clear()


def count_launches(fn) -> LaunchCounter:
    """Run ``fn()`` once under a :class:`LaunchCounter` and return the counter."""
    with LaunchCounter() as counter:
        fn()
    return counter


__all__ = ["LaunchCounter", "NO_LAUNCH", "count_launches"]
