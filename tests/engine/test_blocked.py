"""The engine runs with diffusers and PEFT unimportable: this folder's tests again, in a subprocess
whose conftest blocks both imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_imports_are_blocked_when_asked():
    if not os.environ.get("LORAFUSE_BLOCK_IMPORTS"):
        pytest.skip("runs inside test_engine_tests_pass_with_diffusers_and_peft_blocked")
    for name in ("diffusers", "peft"):
        with pytest.raises(ImportError, match="blocked"):
            __import__(name)
    import lorafuse.engine  # noqa: F401

    assert not [m for m in sys.modules if m.split(".")[0] in ("diffusers", "peft")]


def test_engine_tests_pass_with_diffusers_and_peft_blocked():
    if os.environ.get("LORAFUSE_BLOCK_IMPORTS"):
        pytest.skip("already the blocked run")
    env = dict(os.environ, LORAFUSE_BLOCK_IMPORTS="diffusers,peft")
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/engine", "-q", "-p", "no:cacheprovider", "-x", "-rA"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    assert "PASSED tests/engine/test_blocked.py::test_imports_are_blocked_when_asked" in out.stdout, tail
