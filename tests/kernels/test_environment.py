"""What the kernels need from the installed Triton / NumPy / torch, checked host-side: a clear error
where the interpreter cannot run, and the traceable launch form on every supported torch."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from lorafuse.kernels import _common as C  # noqa: E402


@pytest.fixture
def versions(monkeypatch):
    """Set (triton, numpy) versions for interpreter_problem(); its cache is cleared around the test."""
    import numpy

    def set_versions(tri: str, np: str):
        monkeypatch.setattr(triton, "__version__", tri)
        monkeypatch.setattr(numpy, "__version__", np)
        C.interpreter_problem.cache_clear()

    yield set_versions
    monkeypatch.undo()
    C.interpreter_problem.cache_clear()


@pytest.mark.parametrize("tri,np,broken", [
    ("3.6.0", "2.4.0", True), ("3.4.0", "2.5.5", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.5.5", False),
    ("3.9.0", "2.4.6", False), ("3.6.0+git1234", "2.4.0rc1", True),
])
def test_interpreter_problem_names_the_fix(versions, tri, np, broken):
    versions(tri, np)
    msg = C.interpreter_problem()
    assert (msg is not None) == broken
    if broken:
        assert tri in msg and np in msg and 'numpy<2.4' in msg and "Triton >= 3.7" in msg


def test_triton_backend_on_cpu_raises_the_interpreter_problem(versions, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    versions("3.6.0", "2.5.5")
    with pytest.raises(RuntimeError, match=r"fused_lora_linear: backend='triton' on cpu: .*numpy<2.4"):
        C.resolve_backend("triton", torch.device("cpu"))
    assert C.resolve_backend("torch", torch.device("cpu")) == "torch"  # the reference never needs Triton
    assert C.resolve_backend("auto", torch.device("cpu")) == "torch"
    versions("3.7.1", "2.5.5")
    assert C.resolve_backend("triton", torch.device("cpu")) == "triton"


def test_traceable_hands_interpreted_kernels_back_and_wraps_real_ones(monkeypatch):
    """torch 2.6-2.12's wrap_triton rejects interpreted kernels; traceable() never passes one to it."""
    calls = []
    monkeypatch.setattr(C, "wrap_triton", lambda k: calls.append(k) or ("wrapped", k))
    kernel = object()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.traceable(kernel) is kernel and not calls
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert C.traceable(kernel) == ("wrapped", kernel) and calls == [kernel]
