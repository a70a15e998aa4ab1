"""The wheels the lent GPU machines lack, fetched here and installed there without a network.

The lent H100/H200 machines run Python 3.12 with torch 2.11.0+cu130, Triton 3.6.0, transformers 5.17,
accelerate 1.15 and huggingface_hub 1.33, have no diffusers and reach no package registry. The GPU check
needs diffusers and PEFT at the versions this project tests, and ``pytest -m gpu`` needs pytest. So:

    python -m benchmarks.gpu_check --fetch-wheels .whl      # here (pip reaches the registry): ~16 MB
    python -m benchmarks.gpu_check --wheels .whl --out ...  # there: unpacked into a temporary folder

:data:`WHEELS` pins, name==version, exactly what the lent stack lacks: the dependency closure of
diffusers, PEFT and the test extras minus :data:`LENT_STACK` (torch, triton, transformers, accelerate,
huggingface_hub and everything they pull in, as pip installs them into a fresh Python 3.12 venv).
:func:`check_closure` proves the pin complete from the wheels' own metadata; the dry run under such a
venv (``/work/venvs/lent``-style, see benchmarks/README.md) proves it in practice.

Only the standard library at import time: :func:`install` runs before anything imports diffusers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: CPython 3.12, manylinux x86_64: what the lent machines run.
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")

#: What the lent stack lacks, at the versions this project tests (the CPU default stack's versions).
WHEELS = (
    "diffusers==0.42.1",            # the integration; the lent machine has none
    "peft==0.21.2",                 # the version tested (the machine's own, if any, is shadowed)
    "importlib_metadata==10.2.0",   # diffusers
    "zipp==4.1.2",                  # importlib_metadata
    "lazy_importer==0.1.0",         # importlib_metadata (Python < 3.15)
    "pillow==13.0.0",               # diffusers (cp312 manylinux wheel)
    "requests==2.34.2",             # diffusers
    "urllib3==2.7.0",               # requests (idna, certifi: in the lent stack)
    "charset_normalizer==3.4.7",    # requests (cp312 manylinux wheel)
    "pytest==9.0.3",                # the pytest part (pytest -m gpu)
    "iniconfig==2.3.0",             # pytest (packaging, pygments: in the lent stack)
    "pluggy==1.6.0",                # pytest
    "pytest_benchmark==5.2.3",      # the test extra (benchmarks/test_bench_*.py)
    "py_cpuinfo==9.0.0",            # pytest-benchmark
    "hypothesis==6.155.2",          # the test extra
    "sortedcontainers==2.4.0",      # hypothesis
)
#: Optional (``--with-matplotlib``): the plots. The lent machines have matplotlib; a bare
#: lent-stack venv does not, and the check then writes its tables without the PNGs.
PLOT_WHEELS = (
    "matplotlib==3.11.2", "contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.69.1", "kiwisolver==1.5.1",
    "pyparsing==3.3.2", "python_dateutil==2.9.0.post0", "six==1.17.0",
)

#: What the lent stack already has (pip's resolution of torch==2.11.0, triton==3.6.0, transformers==5.17.0,
#: accelerate==1.15.0, huggingface_hub==1.33.0 into a fresh Python 3.12 venv, with pip and setuptools);
#: versions as installed there, for the requirement check only (the machine's own may differ slightly).
LENT_STACK = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0",
    "huggingface_hub": "1.33.0", "annotated_doc": "0.0.7", "annotated_types": "0.8.0", "anyio": "4.16.0",
    "certifi": "2026.10.19.post1", "click": "8.5.1", "cuda_bindings": "13.5.0", "cuda_pathfinder": "1.9.1",
    "cuda_toolkit": "13.0.2", "filelock": "4.3.2", "fsspec": "2026.9.0", "h11": "0.16.0", "hf_xet": "1.8.0",
    "httpcore": "1.0.9", "httpx": "0.29.0", "idna": "3.21", "jinja2": "3.1.6", "markdown_it_py": "4.3.0",
    "markupsafe": "3.0.4", "mdurl": "0.1.2", "mpmath": "1.3.0", "networkx": "3.7", "numpy": "2.5.5",
    "packaging": "26.4", "pip": "23.2.1", "psutil": "7.2.2", "pydantic": "2.14.4", "pydantic_core": "2.50.5",
    "pygments": "2.21.0", "pyyaml": "6.0.4", "regex": "2026.12.2", "rich": "15.0.0", "safetensors": "0.8.0",
    "setuptools": "81.0.0", "shellingham": "1.5.4", "sympy": "1.14.0", "tokenizers": "0.23.3",
    "tqdm": "4.70.1", "typer": "0.29.2", "typing_extensions": "4.16.0", "typing_inspection": "0.4.5",
}


def canonical(name: str) -> str:
    """PEP 503-style name, '_' instead of '-': ``Pillow`` -> ``pillow``, ``py-cpuinfo`` -> ``py_cpuinfo``."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned(with_matplotlib: bool = False) -> dict[str, str]:
    """``{canonical name: version}`` of :data:`WHEELS` (and :data:`PLOT_WHEELS`); raises on a malformed
    entry or a name pinned twice."""
    out: dict[str, str] = {}
    for spec in WHEELS + (PLOT_WHEELS if with_matplotlib else ()):
        name, sep, version = spec.partition("==")
        if not sep or not name or not re.fullmatch(r"[0-9][0-9A-Za-z.+!]*", version):
            raise ValueError(f"wheels: {spec!r} is not name==version")
        key = canonical(name)
        if key in out:
            raise ValueError(f"wheels: {name} pinned twice")
        out[key] = version
    return out


def wheel_name(path: Path) -> tuple[str, str]:
    """(canonical distribution name, version) from a wheel's file name."""
    parts = Path(path).name[: -len(".whl")].split("-")
    return canonical(parts[0]), parts[1]


# ------------------------------------------------------------------------------------------ fetch
def fetch(dest: Path, with_matplotlib: bool = False, python: str = sys.executable) -> list[Path]:
    """Download the pinned wheels for CPython 3.12 manylinux x86_64 into ``dest`` (``pip download --no-deps
    --only-binary=:all:``), drop wheels of other versions left there by an earlier pin, and check the pin's
    closure. Returns the wheels; raises ``RuntimeError`` when pip fails or the closure is incomplete."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    want = pinned(with_matplotlib)
    specs = [f"{n}=={v}" for n, v in want.items()]
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
           "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("pip download failed:\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    for whl in sorted(dest.glob("*.whl")):  # one version per name: two would both be unpacked
        name, version = wheel_name(whl)
        if want.get(name) != version:
            whl.unlink()
    wheels = sorted(dest.glob("*.whl"))
    missing = sorted(set(want) - {wheel_name(w)[0] for w in wheels})
    if missing:
        raise RuntimeError(f"pip download left no wheel for {missing}")
    problems = check_closure(wheels)
    if problems:
        raise RuntimeError("the pinned wheels are not a closed set over the lent stack:\n  " + "\n  ".join(problems))
    return wheels


def _requirements(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]  # the headers; the long description follows the first blank line
    return [ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.startswith("Requires-Dist:")]


def check_closure(wheels: list[Path], provided: dict[str, str] | None = None) -> list[str]:
    """Every requirement of every wheel (markers evaluated for CPython 3.12 on Linux x86_64, no extras)
    must be met by another wheel of the set or by ``provided`` (default :data:`LENT_STACK`), at a version
    its specifier admits. Returns the problems (empty: the set is complete)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    have = dict(LENT_STACK if provided is None else provided)
    have.update(dict(wheel_name(w) for w in wheels))
    env = {"python_version": PYTHON_VERSION, "python_full_version": PYTHON_VERSION + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    problems = []
    for whl in wheels:
        for line in _requirements(whl):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonical(req.name)
            if name not in have:
                problems.append(f"{Path(whl).name} needs {line}: neither pinned nor in the lent stack")
            elif req.specifier and not req.specifier.contains(have[name], prereleases=True):
                problems.append(f"{Path(whl).name} needs {line}: {name} {have[name]} does not satisfy it")
    return problems


# ---------------------------------------------------------------------------------------- install
def _unpack(whl: Path, target: Path) -> None:
    """What ``pip install --no-deps --target`` does for one wheel: its files into ``target``, the
    ``*.data/purelib`` and ``*.data/platlib`` trees merged in (scripts, headers and data are dropped)."""
    with zipfile.ZipFile(whl) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for sub in ("purelib", "platlib"):
            tree = data / sub
            if tree.is_dir():
                shutil.copytree(tree, target, dirs_exist_ok=True)
        shutil.rmtree(data)


def _top_level(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as z:
        names = {n.split("/", 1)[0] for n in z.namelist()}
    return {n.split(".", 1)[0] for n in names if not n.endswith((".dist-info", ".data"))}


def install(src: Path, target: Path | None = None) -> Path:
    """Unpack every wheel in ``src`` into ``target`` (default: a new temporary folder), put it first on
    ``sys.path`` and on ``PYTHONPATH`` (so that child processes see it too), and return it. Offline: no
    pip, no index. Raises when ``src`` holds no wheel or two versions of one distribution; warns when a
    package a wheel provides was already imported (its old copy stays in use in this process)."""
    src = Path(src)
    wheels = sorted(src.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"--wheels {src}: no *.whl there (run python -m benchmarks.gpu_check --fetch-wheels {src})")
    names = [wheel_name(w)[0] for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--wheels {src}: several versions of {twice}; keep one of each")
    early = sorted(m for w in wheels for m in _top_level(w) if m in sys.modules)
    if early:  # e.g. by a site .pth file: that copy stays in use in this process (child processes get ours)
        import warnings

        warnings.warn(f"--wheels: {early} were imported before the wheels were installed; this process keeps "
                      "those copies", RuntimeWarning, stacklevel=2)
    target = Path(target) if target is not None else Path(tempfile.mkdtemp(prefix="lorafuse-wheels-"))
    target.mkdir(parents=True, exist_ok=True)
    for whl in wheels:
        _unpack(whl, target)
    sys.path.insert(0, str(target))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(target) + (os.pathsep + old if old else "")
    import importlib

    importlib.invalidate_caches()
    return target
