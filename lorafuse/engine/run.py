"""The state of one sampling run: what a run carries from one denoiser call to the next.

A sampling run is the loop of denoiser calls of one generation (one ``pipe(...)`` call, or the
caller's own ``for t in timesteps`` loop around :meth:`ModuleFusion.step`). Its state is

    step       denoiser calls of this run so far (the next call's index, from 0)
    tau        the progress of the current call in [0, 1] (0 = first, noisiest), float or 0-d tensor
    timestep   the raw timestep value of the current call (for the gate log; None when not given)
    num_steps  the sampler's step count when known (K-LoRA / EST's official counter mode needs it)
    record     the current call's gate-log recorder ``record(layer_index)``, or None (not logging)
    marker     what tells this run from the next (the diffusers integration: the scheduler's
               ``timesteps`` tensor, replaced by every ``set_timesteps``; None for plain modules)

    thread     the thread that started the run (a pipeline call makes all its denoiser calls in one)
    state      the method's per-run state while another run is current (``FusionMethod.run_state``:
               KL's speculative gates; None for the methods that keep none)

It belongs to the run, not to the installation: :class:`~lorafuse.engine.runtime.FusionEngine`
keeps the runs of concurrent requests in a :class:`RunTable` (bounded) and its per-layer calls
read the current one, the run of the denoiser call that holds the installation's lock. The
method's step state (its gate tensors) and the merged weights live once per installation: each
denoiser call sets them to its own run's step (``begin_step``, the merged-weight flips).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

__all__ = ["RunTable", "SamplingRun"]


class SamplingRun:
    """One sampling run's state (see the module docstring); plain attributes, read on every layer
    call (``record``), so ``__slots__`` keeps the reads cheap."""

    __slots__ = ("_marker", "step", "tau", "timestep", "num_steps", "record", "thread", "state")

    def __init__(self, marker: Any = None):
        self.marker = marker
        self.step = 0
        self.tau: float | torch.Tensor | None = None
        self.timestep: float | torch.Tensor | None = None
        self.num_steps: int | None = None
        self.record: Callable[[int], None] | None = None
        self.thread = threading.get_ident()
        self.state: Any = None

    @property
    def marker(self) -> Any:
        """The marker, held weakly where it can be (a scheduler's ``timesteps`` tensor): a run does
        not keep its marker alive, and a run whose marker is gone is over (:meth:`RunTable.add`
        drops it). None once the marker is gone."""
        m = self._marker
        return m() if isinstance(m, weakref.ref) else m

    @marker.setter
    def marker(self, value: Any) -> None:
        try:
            self._marker = weakref.ref(value)
        except TypeError:  # None, a plain object(): held as is
            self._marker = value

    def over(self) -> bool:
        """True when the run's marker was held weakly and is gone (nothing can continue the run)."""
        m = self._marker
        return isinstance(m, weakref.ref) and m() is None

    def invalidate(self) -> None:
        """Make the next denoiser call start a new run (e.g. the pipeline's scheduler was swapped):
        no marker compares equal to a fresh object."""
        self.marker = object()

    def __repr__(self) -> str:
        return f"SamplingRun(step={self.step}, tau={self.tau!r}, num_steps={self.num_steps})"


class RunTable:
    """The sampling runs of one installation by marker identity (a scheduler's ``timesteps`` tensor:
    one per request under diffusers' server pattern), at most ``size``: beyond it the least recently
    used run is dropped. A dropped run whose marker is still alive comes back as a RuntimeError
    (:meth:`get`), never as a silent fresh run: more than ``size`` requests were interleaved. Runs
    hold their markers weakly: a run whose marker is gone is over and leaves at the next :meth:`add`,
    so a service keeps the runs of the requests in flight, not the last ``size``."""

    def __init__(self, size: int = 64):
        self.size = size
        self._runs: OrderedDict[int, SamplingRun] = OrderedDict()
        self._dropped: dict[int, weakref.ref] = {}  # id(marker) -> the dropped run's marker, while it lives

    def __len__(self) -> int:
        return len(self._runs)

    def find(self, marker: Any) -> SamplingRun | None:
        """The kept run started with ``marker`` (the same object), or None."""
        run = self._runs.get(id(marker))
        return run if run is not None and run.marker is marker else None

    def get(self, marker: Any) -> SamplingRun | None:
        """The run started with ``marker`` (the same object), or None: a new run (see the class)."""
        key = id(marker)
        run = self.find(marker)
        if run is not None:
            self._runs.move_to_end(key)
            return run
        dropped = self._dropped.get(key)
        if dropped is not None and dropped() is marker:
            raise RuntimeError(f"lorafuse: a sampling run resumed after more than {self.size} other runs went through "
                               "the same installation since its last denoiser call; its state is gone (serve fewer "
                               "concurrent requests per installation)")
        return None

    def add(self, run: SamplingRun) -> None:
        """Keep ``run`` under its marker (replacing a run with the same marker); the runs whose
        marker is gone (a finished request's scheduler, timesteps replaced by ``set_timesteps``) go."""
        for old_key in [k for k, r in self._runs.items() if r.over()]:
            del self._runs[old_key]
        key = id(run.marker)
        self._runs[key] = run
        self._runs.move_to_end(key)
        self._dropped.pop(key, None)
        while len(self._runs) > self.size:
            old_key, old = self._runs.popitem(last=False)
            try:
                self._dropped[old_key] = weakref.ref(old.marker, lambda _, k=old_key, d=self._dropped: d.pop(k, None))
            except TypeError:  # None or a plain object: nothing to recognise it by later
                pass

    def drop_states(self) -> None:
        """Every kept run continues with a new run's method state (the method was prepared again)."""
        for run in self._runs.values():
            run.state = None
