"""Merged weights for the patched layers of methods whose gates are fixed within a denoiser call
(K-LoRA, EST, merge; also K-LoRA/EST's official counter mode, whose gates change between calls).

Such a layer runs one ``F.linear`` on its effective weight

    W_eff = W + g_c dW_c + g_s dW_s,     dW_i = s_i B_i A_i     (fp32 accumulation, one rounding)

and W_eff is rebuilt, always from the original W (no drift across calls or generations), only when
the layer's gates, PEFT's live scalings or the weights change. Where W_eff lives is ``weights``:

- "scratch" (default): a device copy per patched layer (+ N K itemsize bytes each); W itself is never
  written, so PEFT, ``fuse_lora`` and ``state_dict`` keep seeing the original. The per-step rebuild of
  the layers whose device-side gates flipped is one grouped Triton launch (no host read) on CUDA.
- "inplace": W_eff is written into W itself and the original is kept in host memory (pinned on
  CUDA; + N K itemsize bytes of host memory per layer). Before PEFT's own forward runs on the layer
  (a fallback), before PEFT merges into it (``fuse_lora``) and on ``remove()`` the original is written
  back, bit for bit. On CUDA the per-step rebuild reads the flip mask on the host (one sync per
  denoiser call) and copies the original back to the device for each flipped layer.

Data flows engine -> kernels: the merges are :func:`lorafuse.kernels.merge_lora_weight` and
:func:`lorafuse.kernels.merge_flipped_weights`.
"""

from __future__ import annotations

import torch

from ..kernels._common import resolve_backend
from ..kernels.merge_weight import MergeTable, merge_flipped_weights, merge_lora_weight, merge_lora_weight_torch
from ..kernels.packing import PackedLoRA
from .gate_log import memory_key

WEIGHT_MODES = ("scratch", "inplace", "off")


class _State:
    """One layer's merged weight: ``dst`` (what F.linear reads), ``src`` (where the original W is
    read from: W itself in scratch mode, the host copy in place), the fp32 factors it was built with
    (``pack`` for the scalings ``pack_key``), the host key of its gates and whether it is valid."""

    __slots__ = ("src", "dst", "original", "pack", "pack_key", "weight_key", "gate_key", "valid")

    def __init__(self):
        self.src = self.dst = self.original = self.pack = None
        self.pack_key = self.weight_key = self.gate_key = None
        self.valid = False


def _weight_key(w: torch.Tensor):
    return id(w), w.data_ptr(), w.dtype, w.device


class MergedWeights:
    """The effective weights of ``num_layers`` patched layers (see the module docstring).

    ``build`` (re)makes one layer from its live weight, factors and gates row; ``step`` rebuilds, at
    the start of a denoiser call, every valid layer whose device-side gates changed; ``restore``
    hands a layer's original weight back (in place mode) and invalidates it; ``release`` writes every
    original back and drops the copies.
    """

    def __init__(self, num_layers: int, mode: str, backend: str = "auto"):
        if mode not in WEIGHT_MODES[:2]:
            raise ValueError(f"MergedWeights: mode must be one of {WEIGHT_MODES[:2]}, got {mode!r}")
        self.mode = mode
        self.backend = backend
        self.layers = [_State() for _ in range(num_layers)]
        self.applied: torch.Tensor | None = None  # (layers, 2) fp32: gates each dst was built with (NaN: none)
        self.table: MergeTable | None = None  # grouped Triton rebuild (scratch mode on a Triton backend)
        self._host: set[int] = set()  # valid layers with device-side gates that step() rebuilds one by one
        # the gates step() last synced the layers to (kept alive, so its address stays its own) and their
        # memory key: a step whose gates were not written since (a host-decided step without flips,
        # constant gates) has nothing to rebuild
        self._seen_gates: torch.Tensor | None = None
        self._seen = None

    def current(self, i: int, weight: torch.Tensor, pack_key) -> bool:
        """Whether layer i holds a merged weight built from this weight and these factors."""
        st = self.layers[i]
        return st.valid and st.pack_key == pack_key and st.weight_key == _weight_key(weight)

    def _use_table(self, device: torch.device) -> bool:
        return self.mode == "scratch" and resolve_backend(self.backend, device, "merged weights") == "triton"

    def build(self, i: int, weight: torch.Tensor, loras, pack_key, row: torch.Tensor, gate_key) -> torch.Tensor:
        """(Re)build layer i: ``dst = W + sum_j row[j] dW_j`` from its original W; returns dst.

        ``loras``: the two ``(A, B, scale)`` triples (scales folded in fp32 once per ``pack_key``);
        ``row``: (2,) fp32 gates on the weight's device; ``gate_key``: their host key (or None)."""
        st = self.layers[i]
        w = weight.detach()
        if st.pack is None or st.pack_key != pack_key or st.pack.device != w.device:
            with torch.no_grad():
                st.pack = PackedLoRA.pack(loras, dtype=torch.float32, device=w.device)
            st.pack_key = pack_key
        if self.mode == "scratch":
            st.src = w
            if st.dst is None or st.dst.shape != w.shape or st.dst.dtype != w.dtype or st.dst.device != w.device:
                st.dst = torch.empty_like(w, memory_format=torch.contiguous_format)
            merge_lora_weight(w, st.pack, row, out=st.dst, backend=self.backend)
        else:
            if st.original is None:  # first build: keep the original, exactly, in host memory
                st.original = w.to("cpu", copy=True)
                if w.is_cuda:
                    st.original = st.original.pin_memory()
            st.src = st.dst = w
            w.copy_(st.original, non_blocking=True)
            merge_lora_weight(w, st.pack, row, out=w, backend=self.backend)
        st.gate_key = gate_key
        st.weight_key = _weight_key(weight)
        st.valid = True
        if gate_key is None:  # device-side gates: the step rebuild compares against this row
            self._applied(w.device)[i].copy_(row)
            self._host.add(i)
            if self._use_table(w.device):
                table = self._table(w.device)
                if table.accepts(st.src, st.dst, st.pack):
                    table.set(i, st.src, st.dst, st.pack)
                    self._host.discard(i)
                else:  # e.g. a non-contiguous weight: rebuilt on the host side of step()
                    table.disable(i)
        return st.dst

    def _applied(self, device) -> torch.Tensor:
        if self.applied is None or self.applied.device != device:
            self.applied = torch.full((len(self.layers), 2), float("nan"), dtype=torch.float32, device=device)
        return self.applied

    def _table(self, device) -> MergeTable:
        if self.table is None or self.table.device != device:
            self.table = MergeTable(len(self.layers), 2, device)
        return self.table

    def step(self, gates: torch.Tensor) -> None:
        """Rebuild every valid layer whose row of ``gates`` (layers, 2) differs from the row it was
        built with. Scratch mode on Triton: one grouped launch, no host read; otherwise the flip mask
        is read on the host (free on a CPU) and the flipped layers are rebuilt one by one."""
        if self.applied is None:
            return
        seen = memory_key(gates)
        if seen == self._seen:
            return
        self._seen, self._seen_gates = seen, gates
        if self.table is not None and self.table.device == gates.device:
            self._host_step(gates)
            merge_flipped_weights(self.table, gates, self.applied, backend="triton")  # also applied <- gates
            return
        if gates.device.type == "cpu" and torch.equal(gates, self.applied):  # nothing flipped (the usual step)
            return
        self._host_step(gates)
        self.applied.copy_(gates)

    def _host_step(self, gates: torch.Tensor) -> None:
        if not self._host:
            return
        flipped = (gates != self.applied).any(dim=1).tolist()
        for i in sorted(self._host):
            if flipped[i]:
                st = self.layers[i]
                if self.mode == "inplace":
                    st.dst.copy_(st.original, non_blocking=True)
                if resolve_backend(self.backend, st.dst.device, "merged weights") == "torch":
                    merge_lora_weight_torch(st.src, st.pack, gates[i], st.dst)  # as built: no checks again
                else:
                    merge_lora_weight(st.src, st.pack, gates[i], out=st.dst, backend=self.backend)

    def _write_back(self, i: int, weight: torch.Tensor | None) -> None:
        """In place mode: layer i's original into ``weight`` (default: the tensor it was built in),
        cast to that weight's dtype and device."""
        st = self.layers[i]
        if self.mode == "inplace" and st.valid:
            target = (weight if weight is not None else st.dst).detach()
            with torch.no_grad():
                target.copy_(st.original)

    def restore(self, i: int, weight: torch.Tensor | None = None) -> None:
        """Invalidate layer i (the next :meth:`build` makes it again); in place mode first write its
        original back (see :meth:`_write_back`)."""
        self._write_back(i, weight)
        st = self.layers[i]
        st.valid = False
        st.gate_key = None
        self._host.discard(i)
        if self.applied is not None:
            self.applied[i].fill_(float("nan"))
        if self.table is not None:
            self.table.disable(i)

    def release(self, weights=None) -> None:
        """Write every original back (``weights[i]``: layer i's live weight) and drop every copy."""
        for i in range(len(self.layers)):
            self._write_back(i, None if weights is None else weights[i])
        self.layers = [_State() for _ in self.layers]
        self.applied = self.table = None
        self._seen = self._seen_gates = None
        self._host.clear()
