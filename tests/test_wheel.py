"""`lorafuse bench` works from an installed wheel, not only from a checkout: build a wheel from the
package sources, install it into a fresh virtual environment (the running environment's torch, triton
and numpy through --system-site-packages and a .pth file; the wheel with --no-deps) and run
`lorafuse bench --quick` there, outside the repository."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout=900):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{(out.stdout + out.stderr)[-4000:]}"
    return out.stdout


def test_bench_runs_from_an_installed_wheel(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lorafuse", src / "lorafuse", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          src], tmp_path)
    wheel = next((tmp_path / "dist").glob("lorafuse-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    bindir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    python = bindir / "python"
    # --system-site-packages reaches the base interpreter's packages only; when this test itself runs in
    # a venv (the stack checks), its torch / triton / numpy live there: list them after the new venv's own
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    venv_site = Path(_run([python, "-c", purelib], tmp_path).strip())
    (venv_site / "_test_host_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp_path)
    work = tmp_path / "work"  # not the checkout: nothing of the repository is importable from here
    work.mkdir()
    where = _run([python, "-c", "import lorafuse; print(lorafuse.__file__)"], work).strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    out = _run([bindir / "lorafuse", "bench", "--quick", "--device", "cpu", "--shapes", "64x96x80", "--rounds", "1",
                "--providers", "F.linear,torch_seq,lorafuse_static,merged_scratch", "--probe-copy-mb", "4",
                "--probe-gemm-n", "128"], work)
    assert "lorafuse per-layer benchmark" in out and "merged_scratch" in out, out[-2000:]
    assert (work / "lorafuse-bench" / "results.csv").is_file()  # under the current directory
