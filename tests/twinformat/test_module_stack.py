"""Each package is a stack: no two modules import each other in a circle, and ``converters``'
modules sit on floors (storage, views, conversion, features, command line), each importing only
its own floor or those below. Function-level and ``TYPE_CHECKING`` imports count: a lazy import
is still a dependency a reader must follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("twinformat", "torch_impl", "flax_impl", "converters")

# converters' floors, bottom first (the package's own docstring lists them).
CONVERTERS_FLOORS = (
    ("storage", {"files", "sharded"}),
    ("views", {"rename", "views"}),
    ("conversion", {"sides", "convert", "file_convert", "sharded_flax"}),
    ("features", {"saving", "sharded_save", "merge", "peft"}),
    ("command line", {"cli", "__main__"}),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, the package's ``__init__`` (its
    facade, which re-exports) left out as a target."""
    paths = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_init = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_init else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found.update(c for c in candidates if c in paths and c not in (name, package))
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_two_modules_of_a_package_import_each_other_in_a_circle(package):
    assert cycles(internal_imports(package)) == []


def test_the_cycle_finder_finds_a_circle_through_a_lazy_import(tmp_path):
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_every_converters_module_sits_on_one_floor():
    modules = {name.removeprefix("converters.") for name in internal_imports("converters")} - {"converters"}
    placed = [m for _, floor in CONVERTERS_FLOORS for m in floor]
    assert sorted(placed) == sorted(set(placed)), "a module on two floors"
    assert modules == set(placed), f"not on a floor: {modules - set(placed)}; gone: {set(placed) - modules}"


def test_converters_imports_point_down_the_floors():
    floor_of = {m: level for level, (_, floor) in enumerate(CONVERTERS_FLOORS) for m in floor}
    offenders = [
        f"{module} ({CONVERTERS_FLOORS[floor_of[module[11:]]][0]}) imports {target} "
        f"({CONVERTERS_FLOORS[floor_of[target[11:]]][0]})"
        for module, targets in internal_imports("converters").items()
        if module != "converters"
        for target in targets
        if floor_of[target[11:]] > floor_of[module[11:]]
    ]
    assert not offenders, "\n".join(offenders)


def test_no_converters_module_only_forwards_names():
    """A module whose every statement is an import (plus its docstring and ``__all__``) is a detour."""
    for path in (ROOT / "converters").glob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        body = ast.parse(path.read_text()).body
        own = [
            node
            for node in body
            if not isinstance(node, (ast.Import, ast.ImportFrom))
            and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
            and not (
                isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__all__"]
            )
        ]
        assert own, f"{path.name} only forwards names"
