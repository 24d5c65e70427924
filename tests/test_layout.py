"""The package's shape: no import cycles, small modules, a torch-free ``import arc_dist``.

The import graph is read from the source with ``ast``, function-level imports included (a cycle
hidden in a function body is still a cycle; it only fails later, at the first call). Imports
under ``if TYPE_CHECKING:`` never run and are left out. Importing ``a.b.c`` also runs ``a.b``'s
``__init__``, so an import of a submodule depends on every package above it too, except the
importer's own packages (a package's ``__init__`` importing its submodules is no cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "arc_dist"
MAX_LINES = 500
#: modules still over MAX_LINES, each waiting for a split
LONG_MODULES = {
    "arc_dist.controller",  # the step's orchestration: Arc's public methods and their docs
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imported(name: str, node: ast.Import | ast.ImportFrom, is_package: bool, mods) -> set[str]:
    """The package's modules an import statement in module ``name`` loads."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        subs = [f"{prefix}.{alias.name}" for alias in node.names]
        targets = [prefix] + [s for s in subs if s in mods]
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the module and every package above it
            out.add(".".join(parts[:i]))
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return {m for m in out if m in mods and m not in own}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                deps |= _imported(name, node, path.name == "__init__.py", mods)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_sees_function_level_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    deps = import_graph()
    # a function-level import (controller imports the preflight only when configured)
    assert "arc_dist.health" in deps["arc_dist.controller"]
    # a TYPE_CHECKING import never runs
    assert "arc_dist.controller" not in deps["arc_dist.chaos"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles among arc_dist modules: {found}"


def test_checkpoint_package_imports_at_the_top():
    """What a checkpoint module needs is visible at its top: durable state is loaded in
    processes that may die at any line, and a late import failing there loses the save."""
    mods = _modules()
    hidden = []
    for name, path in mods.items():
        if not name.startswith("arc_dist.checkpoint"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if (isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip
                    and node.col_offset > 0
                    and _imported(name, node, path.name == "__init__.py", mods)):  # fmt: skip
                hidden.append(f"{name}:{node.lineno}")
    assert hidden == []


def test_modules_stay_small():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= LONG_MODULES, f"modules over {MAX_LINES} lines: {long}"


def test_import_arc_dist_and_the_launcher_load_no_torch():
    code = (
        "import sys, arc_dist, arc_dist.elastic.launcher, arc_dist.launch\n"
        "arc_dist.ArcConfig(); arc_dist.HangError; arc_dist.ExitCode\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_runtime_fault_a_user_may_catch_is_exported():
    import arc_dist
    from arc_dist import errors
    from arc_dist.checkpoint import CheckpointStorageError

    faults = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, (errors.ArcError, errors.Preempted))
    }
    assert faults | {"CheckpointStorageError"} <= set(arc_dist.__all__)
    for name in faults:
        assert getattr(arc_dist, name) is getattr(errors, name)
    assert arc_dist.CheckpointStorageError is CheckpointStorageError
