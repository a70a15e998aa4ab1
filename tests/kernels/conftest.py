"""Shared fixture of the kernel tests: every kernel variant compiled for real GPU targets, once."""

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def compile_report() -> str:
    """stdout of ``python -m lorafuse.kernels.compile_check --arch 80 90``: every registered kernel
    variant built for sm_80 and sm_90 in a process without TRITON_INTERPRET (the interpreter accepts
    what GPU compilers reject: tl.dot with K < 16, shared-memory overflow). Run once per session;
    any failing variant fails every test that asks for it."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lorafuse.kernels.compile_check", "--arch", "80", "90"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def compiled(report: str, label: str) -> list[str]:
    """The report's "ok" lines of the variants whose label contains ``label``."""
    return [line for line in report.splitlines() if line.startswith("ok   sm_") and label in line]
