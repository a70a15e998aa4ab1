"""Test set-up: without a GPU, Triton kernels run through the interpreter (set before lorafuse is
imported, since Triton reads TRITON_INTERPRET when kernels are decorated)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: meaningful only on a CUDA GPU without the interpreter (benchmarks.gpu_check runs -m gpu)"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
