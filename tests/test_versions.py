"""setup.py promises exactly the versions CI tests: each declared bound is a stack that
`python -m benchmarks.stack_check ci` (run by .ci/run) installs, so the promise and the matrix
cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from benchmarks import stack_check as S

REPO = Path(__file__).resolve().parent.parent


def setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's ``setup(...)`` call."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # open(...).read() and the like
            pass
    return out


def bounds(spec: str) -> tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]:
    """'torch>=2.8,<2.15' -> ('torch', (2, 8), (2, 15))."""
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    lo = re.search(r">=\s*([0-9.]+)", spec)
    hi = re.search(r"<\s*([0-9.]+)", spec)
    ver = lambda m: tuple(int(p) for p in m.group(1).split(".")) if m else None  # noqa: E731
    return name.lower(), ver(lo), ver(hi)


def pins(stack: S.Stack) -> dict[str, tuple[int, ...]]:
    """{package: (major, minor)} of a stack's '==' pins (and of the requirements files it reads)."""
    lines = list(stack.pip)
    if "-r" in lines:
        lines += (REPO / lines[lines.index("-r") + 1]).read_text().splitlines()
    out = {}
    for line in lines:
        m = re.match(r"([A-Za-z0-9_.-]+)==([0-9]+)\.([0-9]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = (int(m.group(2)), int(m.group(3)))
    return out


def minor(t):
    return t[:2]


def ci_stacks():
    text = (REPO / ".ci" / "run").read_text()
    assert "benchmarks.stack_check ci" in text, ".ci/run must run the version matrix"
    return {name: S.STACKS[name] for name in S.CI}


def test_every_ci_stack_exists_and_ci_runs_them():
    stacks = ci_stacks()
    assert set(stacks) == set(S.CI) and {"floor", "newest", "gpu-lent", "diffusers-floor"} <= set(stacks)


def test_torch_and_triton_floors_are_the_floor_stack():
    req = {bounds(s)[0]: bounds(s)[1:] for s in setup_kwargs()["install_requires"]}
    floor = pins(S.STACKS["floor"])
    assert req["torch"][0] == floor["torch"], (req["torch"], floor)
    assert req["triton"][0] == floor["triton"], (req["triton"], floor)


def test_upper_bounds_are_one_past_the_newest_tested_minor():
    """`<X.Y+1`: the newest tested minor is admitted, the first untested one is not."""
    req = {bounds(s)[0]: bounds(s)[1:] for s in setup_kwargs()["install_requires"]}
    stacks = ci_stacks()
    tested = {pkg: max(p[pkg] for st in stacks.values() if pkg in (p := pins(st))) for pkg in ("torch", "triton")}
    ci = (REPO / ".ci" / "run").read_text()
    for pkg in ("torch", "triton"):  # the default stack: README's test command in .ci/run
        m = re.search(rf"{pkg}==([0-9]+)\.([0-9]+)", ci)
        assert m, f".ci/run must pin {pkg} for README's test command"
        tested[pkg] = max(tested[pkg], (int(m.group(1)), int(m.group(2))))
    for pkg, newest in tested.items():
        assert req[pkg][1] == (newest[0], newest[1] + 1), (pkg, req[pkg], newest)


def test_every_triton_minor_in_the_range_is_tested_in_ci():
    req = {bounds(s)[0]: bounds(s)[1:] for s in setup_kwargs()["install_requires"]}
    (lo_major, lo), (hi_major, hi) = req["triton"]
    assert lo_major == hi_major == 3
    tested = {pins(st)["triton"] for st in ci_stacks().values() if "triton" in pins(st)}
    tested.add(tuple(int(v) for v in re.search(r"triton==([0-9]+)\.([0-9]+)", (REPO / ".ci/run").read_text()).groups()))
    assert {(3, m) for m in range(lo, hi)} <= tested, sorted(tested)


def test_python_range_is_tested():
    spec = setup_kwargs()["python_requires"]
    lo, hi = bounds("python" + spec)[1:]
    tested = {tuple(int(p) for p in st.python.split(".")) for st in ci_stacks().values() if st.python}
    tested.add((3, 11))  # CI's own interpreter runs README's test command and the "system" stacks
    assert {(3, m) for m in range(lo[1], hi[1])} <= tested, (spec, sorted(tested))


@pytest.mark.parametrize("pkg", ["diffusers", "peft"])
def test_diffusers_extra_floors_are_the_floor_requirements(pkg):
    extra = {bounds(s)[0]: bounds(s)[1] for s in setup_kwargs()["extras_require"]["diffusers"]}
    floor = pins(S.STACKS["diffusers-floor"])
    assert extra[pkg] is not None, f"the diffusers extra must state a floor for {pkg}"
    assert minor(extra[pkg]) == floor[pkg] and len(extra[pkg]) >= 2, (pkg, extra[pkg], floor[pkg])
