"""The supported-version matrix, run: each stack in a venv of its own, built from pinned versions.

    python -m benchmarks.stack_check STACK [STACK ...] [--venvs DIR] [--cleanup] [--jobs N] [--list]
    python -m benchmarks.stack_check gpu-lent        # the lent GPU machines' exact stack, full suite
    python -m benchmarks.stack_check ci --jobs 2     # what .ci/run runs after README's test command

Stacks (:data:`STACKS`):

- ``triton-3.4`` ... ``triton-3.8``: every Triton minor between the floor and the default, each over the
  running interpreter's torch (the CPU build; it pins no Triton): ``compile_check`` for sm_80 / sm_90,
  then the kernel and fusion tests through the interpreter. Fast: one ~150-200 MB wheel each.
- ``floor``: the declared lower bounds, torch 2.8.0 with the Triton it pins (3.4.0), in a fresh venv:
  ``compile_check`` and the kernel and fusion tests (torch's CUDA build from the registry, ~4 GB).
  Triton 3.2 / 3.3 (torch 2.6 / 2.7) are not supported: they reject tuple constexprs
  (``LORA_CHUNKS[i]``, the per-LoRA rank slices the expand kernels skip padding with).
- ``newest``: Python 3.13, torch 2.14.1 (the newest these machines' pip constraints admit) with the
  Triton it pins (3.8.0), in a fresh venv: ``compile_check`` and the kernel and fusion tests.
- ``gpu-lent``: the lent H100/H200 machines' stack (Python 3.12, torch 2.11.0 CUDA build, Triton
  3.6.0, transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0), ~5 GB: ``compile_check``,
  the GPU check's dry run with nothing but the wheels ``gpu_check --fetch-wheels`` prepared (exactly
  what the lent machine gets), then README's whole test suite. ``ci`` runs the kernel and fusion tests
  instead of the whole suite (the default stack ran it with the same diffusers and PEFT; CI's time).
- ``diffusers-floor``: the oldest diffusers / PEFT the ``diffusers`` extra admits
  (``.ci/floor-diffusers.txt``) over the running interpreter's torch and Triton: every test that
  imports diffusers or PEFT.

A stack's venv is reused while its pins are unchanged (a stamp file holds them); ``--venvs`` puts the
venvs elsewhere (CI: a fresh temporary folder), ``--cleanup`` deletes each after its checks (CI: disk),
``--jobs 2`` runs two stacks at once, each check on one thread (on 2 cores the interpreter and ptxas
use one core each: nearly twice the throughput), each stack's log printed whole when it ends.
Triton <= 3.6's interpreter needs NumPy < 2.4 (see ``lorafuse.kernels._common.interpreter_problem``),
so the stacks with such a Triton pin it; GPU compilation does not care.

Exit code 0 when every check of every stack passed. A one-line verdict per check, then a summary.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_DEPS = ["pytest", "pytest-benchmark", "hypothesis", "pyyaml"]
#: lorafuse's install_requires beside torch, triton and numpy: what a fresh venv adds
PACKAGE_DEPS = ["safetensors"]
KERNEL_TESTS = ["tests/kernels", "tests/fusion"]
#: every test that imports diffusers or PEFT (the integration, its users and the CLI)
INTEGRATION_TESTS = ["tests/integrations", "tests/guidance", "tests/sweep", "tests/test_cli.py",
                     "tests/test_cli_usage.py", "tests/test_readme.py", "tests/test_benchmark_smoke.py"]
OLD_INTERPRETER_NUMPY = "numpy<2.4"
_PIP_NOISE = "WARNING: Location 'file:///opt/"  # this machine's pip config names local indexes pip skips


@dataclass(frozen=True)
class Stack:
    """One tested combination. ``base`` "system": a venv over the running interpreter's packages
    (torch 2.13 CPU, test extras), ``pip`` overriding some of them; "fresh": an empty venv of
    ``python`` with ``pip`` alone. ``checks``: "compile", "kernels", "gpu_dry", "suite", "integrations"."""

    base: str
    pip: tuple[str, ...]
    checks: tuple[str, ...]
    python: str = ""  # "3.12": that minor's interpreter (fresh venvs); "": the running one
    what: str = ""
    constraints: tuple[str, ...] = field(default=())  # pins applied to the suite's extra installs
    ci_checks: tuple[str, ...] = field(default=())  # what `ci` runs, when less than ``checks``


def _triton_minor(version: str, numpy_pin: bool) -> Stack:
    pins = (f"triton=={version}",) + ((OLD_INTERPRETER_NUMPY,) if numpy_pin else ())
    return Stack("system", pins, ("compile", "kernels"), what=f"Triton {version} over the default torch")


LENT = ("torch==2.11.0", "triton==3.6.0", "transformers==5.17.0", "accelerate==1.15.0", "huggingface_hub==1.33.0")

STACKS: dict[str, Stack] = {
    "triton-3.4": _triton_minor("3.4.0", True),
    "triton-3.5": _triton_minor("3.5.1", True),
    "triton-3.6": _triton_minor("3.6.0", True),
    "triton-3.7": _triton_minor("3.7.1", False),
    "triton-3.8": _triton_minor("3.8.0", False),
    "floor": Stack("fresh", ("torch==2.8.0", "triton==3.4.0", OLD_INTERPRETER_NUMPY, *PACKAGE_DEPS, *TEST_DEPS),
                   ("compile", "kernels"), python="3.10",
                   what="the declared floor: Python 3.10, torch 2.8.0 + the Triton it pins"),
    "newest": Stack("fresh", ("torch==2.14.1", "triton==3.8.0", "numpy", *PACKAGE_DEPS, *TEST_DEPS),
                    ("compile", "kernels"), python="3.13",
                    what="the newest Python and torch these machines install (torch 2.14.1 pins Triton 3.8)"),
    "gpu-lent": Stack("fresh", (*LENT, OLD_INTERPRETER_NUMPY), ("compile", "gpu_dry", "suite"), python="3.12",
                      what="the lent H100/H200 machines' stack", constraints=LENT,
                      ci_checks=("compile", "gpu_dry", "kernels")),
    "diffusers-floor": Stack("system", ("-r", str(ROOT / ".ci" / "floor-diffusers.txt")), ("integrations",),
                             what="the oldest diffusers + PEFT the diffusers extra admits"),
}
#: what CI runs after README's test command (the default stack: Python 3.11, torch 2.13 CPU, Triton
#: 3.9, the newest): every Triton minor from 3.4 to 3.9 once (3.6 in gpu-lent, 3.8 in newest), every
#: Python minor from 3.10 to 3.13, the oldest and newest torch, the oldest and newest diffusers + PEFT.
CI = ("floor", "triton-3.5", "triton-3.7", "newest", "diffusers-floor", "gpu-lent")


# ------------------------------------------------------------------------------------------ venvs
def _interpreter(minor: str) -> str:
    """An interpreter of Python ``minor`` ("3.12") that runs: the running one, a pyenv build, or one on
    PATH (a pyenv shim of a version that is installed but not selected fails, so each is tried)."""
    if not minor or f"{sys.version_info[0]}.{sys.version_info[1]}" == minor:
        return sys.executable
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python{minor}")))
    candidates += [p for p in (shutil.which(f"python{minor}"),) if p]
    for cand in candidates:
        probe = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return cand
    raise RuntimeError(f"no working Python {minor} interpreter (pyenv build or python{minor} on PATH); install one")


def _pip(py: Path, args, log) -> None:
    """pip install with retries: a registry hiccup is retried, not reported as a broken stack."""
    for attempt in range(3):
        rc = _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], log=log)
        if rc == 0:
            return
        time.sleep(5 * (attempt + 1))
    raise RuntimeError(f"pip install {' '.join(args)} failed 3 times")


def build_venv(name: str, stack: Stack, venvs: Path, log) -> Path:
    """The stack's venv (reused when its stamp matches), returning its python."""
    path = venvs / name
    py = path / "bin" / "python"
    stamp = json.dumps({"base": stack.base, "pip": stack.pip, "python": stack.python,
                        "host": sys.executable if stack.base == "system" else ""})
    if (path / "stamp.json").is_file() and (path / "stamp.json").read_text() == stamp and py.exists():
        return py
    shutil.rmtree(path, ignore_errors=True)
    cmd = [_interpreter(stack.python), "-m", "venv", str(path)]
    if stack.base == "system":
        cmd.insert(3, "--system-site-packages")
    if _run(cmd, log=log):
        raise RuntimeError(f"python -m venv {path} failed")
    _pip(py, stack.pip, log)
    (path / "stamp.json").write_text(stamp)
    return py


# ----------------------------------------------------------------------------------------- checks
def _run(cmd, env=None, log=None, timeout=None) -> int:
    print("$ " + " ".join(cmd), file=log, flush=True)
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"[stack_check] stopped after {timeout} s", file=log, flush=True)
        return 124


def _env(interpret: bool, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "VIRTUAL_ENV")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(extra)
    return env


def _pytest(py: Path, paths, env, log, timeout) -> int:
    return _run([str(py), "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider"], env=env, log=log, timeout=timeout)


def _add_packages(py: Path, stack: Stack, packages, log, workdir: Path) -> int:
    """Install ``packages`` into the stack's venv under its own pins (``constraints``). They change the
    venv, so its stamp goes: the next run rebuilds it pristine (the GPU check's dry run must see the
    lent machine's packages alone)."""
    constraints = workdir / "constraints.txt"
    constraints.write_text("\n".join(stack.constraints) + "\n")
    (py.parent.parent / "stamp.json").unlink(missing_ok=True)
    try:
        _pip(py, ["-c", str(constraints), *packages], log)
        return 0
    except RuntimeError as e:
        print(e, file=log, flush=True)
        return 1


def run_checks(name: str, stack: Stack, py: Path, log, workdir: Path) -> list[tuple[str, bool, float]]:
    """Run the stack's checks; (check, passed, seconds) each."""
    results = []
    # one Triton cache per stack: compile_check's builds are reused by the kernel tests' own report
    cache = dict(TRITON_CACHE_DIR=str(workdir / "triton-cache"))
    # a fresh venv without the test extra (gpu-lent: the lent machine's packages) gets it before its tests
    needs_test_deps = stack.base == "fresh" and not any(p.startswith("pytest") for p in stack.pip)
    for check in stack.checks:
        t0 = time.perf_counter()
        if check == "compile":
            rc = _run([str(py), "-m", "lorafuse.kernels.compile_check", "--arch", "80", "90"],
                      env=_env(False, **cache), log=log, timeout=1200)
        elif check == "kernels":
            rc = _add_packages(py, stack, TEST_DEPS, log, workdir) if needs_test_deps else 0
            rc = rc or _pytest(py, KERNEL_TESTS, _env(True, **cache), log, 1800)
        elif check == "integrations":
            rc = _pytest(py, INTEGRATION_TESTS, _env(True, **cache), log, 2400)
        elif check == "gpu_dry":
            wheels = workdir / "wheels"
            rc = _run([sys.executable, "-m", "benchmarks.gpu_check", "--fetch-wheels", str(wheels)], log=log,
                      timeout=900)
            if rc == 0:
                rc = _run([str(py), "-m", "benchmarks.gpu_check", "--wheels", str(wheels), "--dry-run",
                           "--out", str(workdir / "gpu-dry")], env=_env(True, **cache), log=log, timeout=900)
        elif check == "suite":  # README's test command: the test and diffusers extras, the stack's own pins held
            rc = _add_packages(py, stack, ["diffusers==0.42.1", "peft==0.21.2", "matplotlib", "tqdm", *TEST_DEPS],
                               log, workdir)
            rc = rc or _pytest(py, ["tests"], _env(True, **cache), log, 3000)
        else:
            raise ValueError(f"unknown check {check!r}")
        ok = rc == 0
        results.append((check, ok, time.perf_counter() - t0))
        verdict = "ok" if ok else f"FAILED (exit {rc})"
        say(f"[stack_check] {name}: {check} {verdict} in {time.perf_counter() - t0:.0f} s")
    return results


_PRINT = threading.Lock()


def say(*lines: str) -> None:
    """Print whole lines at once (stacks run in parallel threads)."""
    with _PRINT:
        print(*lines, sep="\n", flush=True)


def run_stack(name: str, checks: tuple[str, ...], venvs: Path, cleanup: bool, log_dir: Path | None) -> list:
    """Build one stack's venv and run ``checks``; its output streams to stdout, or with ``log_dir``
    (parallel runs) goes to a file printed whole when the stack ends. (stack, check, ok, seconds) each."""
    stack, t0 = STACKS[name], time.perf_counter()
    stack = replace(stack, checks=checks)
    log = (log_dir / f"{name}.log").open("w") if log_dir else sys.stdout
    say(f"[stack_check] {name}: {stack.what}")
    workdir = Path(tempfile.mkdtemp(prefix=f"stack-{name}-"))
    try:
        py = build_venv(name, stack, venvs, log)
        say(f"[stack_check] {name}: venv ready in {time.perf_counter() - t0:.0f} s")
        _run([str(py), "-c", "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', "
              "torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"], log=log)
        return [(name, *r) for r in run_checks(name, stack, py, log, workdir)]
    except (RuntimeError, OSError) as e:
        say(f"[stack_check] {name}: could not build the venv: {e}")
        return [(name, "venv", False, time.perf_counter() - t0)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if cleanup:
            shutil.rmtree(venvs / name, ignore_errors=True)
        if log_dir:
            log.close()
            text = (log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            say(f"[stack_check] ---- {name}: log ----", *(ln for ln in text if not ln.startswith(_PIP_NOISE)),
                f"[stack_check] ---- {name}: end of log ----")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stack_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("stacks", nargs="*", help=f"stack names, or 'ci' ({', '.join(CI)}); see --list")
    ap.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "lorafuse-stacks",
                    help="folder of the stacks' venvs (default: ~/.cache/lorafuse-stacks, reused)")
    ap.add_argument("--cleanup", action="store_true", help="delete each stack's venv after its checks")
    ap.add_argument("--jobs", type=int, default=1,
                    help="stacks run at once (each check then on one thread: OMP_NUM_THREADS=1); default 1")
    ap.add_argument("--ci-checks", action="store_true", help="run the named stacks' checks as `ci` does")
    ap.add_argument("--list", action="store_true", help="list the stacks and exit")
    args = ap.parse_args(argv)
    if args.list or not args.stacks:
        for name, s in STACKS.items():
            print(f"{name:16s} {s.what}: {' '.join(s.pip)} -> {', '.join(s.checks)}"
                  + (f" (ci: {', '.join(s.ci_checks)})" if s.ci_checks else ""))
        return 0
    def checks(name: str, as_ci: bool) -> tuple[str, ...]:
        stack = STACKS.get(name)
        return () if stack is None else (stack.ci_checks or stack.checks) if as_ci else stack.checks

    jobs = [(n, checks(n, a == "ci" or args.ci_checks)) for a in args.stacks for n in (CI if a == "ci" else (a,))]
    unknown = [n for n, _ in jobs if n not in STACKS]
    if unknown:
        ap.error(f"unknown stack(s) {', '.join(unknown)}; known: {', '.join(STACKS)}, ci")
    args.venvs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # two single-threaded checks beat two fighting for 2 cores
        log_dir = Path(tempfile.mkdtemp(prefix="stack-logs-"))
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_stack, n, c, args.venvs, args.cleanup, log_dir) for n, c in jobs]
            summary = [row for f in futures for row in f.result()]
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        summary = [row for n, c in jobs for row in run_stack(n, c, args.venvs, args.cleanup, None)]
    say("", f"[stack_check] summary ({time.perf_counter() - t0:.0f} s, {args.jobs} at a time)",
        *(f"  {name:16s} {check:13s} {'ok' if ok else 'FAILED':7s} {secs:6.0f} s" for name, check, ok, secs in summary))
    failed = [f"{n}:{c}" for n, c, ok, _ in summary if not ok]
    say(f"[stack_check] {len(summary) - len(failed)} checks ok, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
