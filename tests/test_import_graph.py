"""Imports flow one way (ARCHITECTURE.md): every ``import`` statement of the package, at module level or
inside a function (lazy imports count: a lazy import that breaks a cycle is still a cycle), is read
from the source, and

- no module imports a sub-package above its own in LAYERS (kernels lowest, commands highest);
- the modules form no cycle;
- no private name (``_name``) is imported from another sub-package.

Imports under ``if TYPE_CHECKING:`` are annotations only and are skipped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorafuse"
# sub-package -> layer: a module may import its own sub-package and the layers below its own
LAYERS = {
    "kernels": 0, "fusion": 1, "engine": 2, "integrations": 3, "guidance": 4, "sweep": 5, "bench": 5,
    "commands": 6, "cli": 7, "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path):
    """(line, imported module, imported names) of every import statement of the file, lazy ones too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_block(node):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target, tuple(a.name for a in node.names)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def subpackage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str, tuple[str, ...]]]]:
    """module -> the package modules it imports; and every (module, line, target, names) import."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    found = []
    for mod, path in mods.items():
        for line, target, names in imports(path):
            if not target or not target.startswith("lorafuse"):
                continue
            found.append((mod, line, target, names))
            submodules = {f"{target}.{n}" for n in names} & set(mods)  # `from pkg import submodule`
            edges[mod] |= submodules
            if not names or len(submodules) < len(names):
                edges[mod].add(target)
    return edges, found


def test_every_subpackage_has_a_layer():
    subs = {subpackage(m) for m in modules()} - {None}
    assert subs <= set(LAYERS), f"add {sorted(subs - set(LAYERS))} to LAYERS and to ARCHITECTURE.md"


def test_no_module_imports_a_layer_above_its_own():
    _, found = graph()
    wrong = []
    for mod, line, target, _ in found:
        a, b = subpackage(mod), subpackage(target)
        if a is None or b is None or a == b:
            continue
        if LAYERS[b] >= LAYERS[a]:
            wrong.append(f"{mod}:{line} imports {target} ({a} is layer {LAYERS[a]}, {b} layer {LAYERS[b]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges, _ = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if n not in edges:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_from_another_subpackage():
    _, found = graph()
    wrong = [f"{mod}:{line} imports {', '.join(n for n in names if n.startswith('_'))} from {target}"
             for mod, line, target, names in found
             if subpackage(mod) != subpackage(target) and any(n.startswith("_") for n in names)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("case", ["cycle", "upward", "private"])
def test_the_checks_catch_what_they_should(case, tmp_path, monkeypatch):
    """The checks themselves, on a small fake package."""
    pkg = tmp_path / "lorafuse"
    for sub in ("kernels", "fusion"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    if case == "cycle":
        (pkg / "fusion" / "a.py").write_text("def f():\n    from . import b\n")
        (pkg / "fusion" / "b.py").write_text("from ..kernels import k\nfrom .a import f\n")
        (pkg / "kernels" / "k.py").write_text("def g():\n    from ..fusion import b\n")
    elif case == "upward":
        (pkg / "kernels" / "k.py").write_text("from ..fusion import x\n")
    else:
        (pkg / "fusion" / "a.py").write_text("from ..kernels.k import _secret\n")
        (pkg / "kernels" / "k.py").write_text("_secret = 1\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    check = {"cycle": test_no_import_cycle, "upward": test_no_module_imports_a_layer_above_its_own,
             "private": test_no_private_name_is_imported_from_another_subpackage}[case]
    with pytest.raises(AssertionError):
        check()
