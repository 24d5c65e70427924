"""The checkpoint package and the controller import each other's pieces only at module level, and
without cycles: what a module needs is visible at its top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "arc_dist"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _targets(mod: str, path: Path, node: ast.AST, mods: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    found = [f"{name}.{a.name}" if f"{name}.{a.name}" in mods else name for a in node.names]
    return [t for t in found if t in mods and t != mod]


def _graph():
    mods = _modules()
    top: dict[str, set[str]] = {}
    nested: list[tuple[str, int, str]] = []
    for mod, path in mods.items():
        top[mod] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(mod, path, node, mods):
                    if node.col_offset == 0:
                        top[mod].add(t)
                    else:
                        nested.append((mod, node.lineno, t))
    return top, nested


def _ours(mod: str) -> bool:
    return mod.startswith("arc_dist.checkpoint") or mod == "arc_dist.controller"


def test_no_imports_hidden_in_function_bodies():
    _, nested = _graph()
    # inside checkpoint/ (anything it imports), and from the controller into checkpoint/
    hidden = [
        f"{m}:{line} -> {t}"
        for m, line, t in nested
        if m.startswith("arc_dist.checkpoint") or (_ours(m) and _ours(t))
    ]
    assert hidden == []


def test_no_import_cycles():
    top, _ = _graph()

    def related(a: str, b: str) -> bool:  # a package and its own submodules
        return a.startswith(b + ".") or b.startswith(a + ".")

    cycles = []
    for start in top:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for n in top.get(node, ()):
                if related(node, n):
                    continue
                if n == start:
                    cycles.append(" -> ".join([*path, start]))
                elif n > start and n not in path:
                    stack.append((n, [*path, n]))
    assert cycles == []
