"""Imports run one way: twinformat <- torch_impl, flax_impl <- converters (SPEC, Layout).

Walks the syntax tree of every module of the four packages, function-level imports included,
so a lazy ``from converters ... import`` inside a twin's function fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("twinformat", "torch_impl", "flax_impl", "converters")
# What each package may import, of the four (itself always).
ALLOWED = {
    "twinformat": set(),
    "torch_impl": {"twinformat"},
    "flax_impl": {"twinformat"},
    "converters": {"twinformat", "torch_impl", "flax_impl"},
}
# Frameworks each package may import (converters: lazily, inside functions or its _torch/_flax).
FRAMEWORKS = {"torch", "jax", "flax", "optax"}
ALLOWED_FRAMEWORKS = {
    "twinformat": set(),
    "torch_impl": {"torch"},
    "flax_impl": {"jax", "flax", "optax"},
    "converters": FRAMEWORKS,
}


def imported_roots(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every import in ``path``, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.append((node.lineno, node.module.split(".")[0]))
    return roots


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_packages_below_it(package):
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {root}"
        for path in modules_of(package)
        for line, root in imported_roots(path)
        if root in PACKAGES and root != package and root not in ALLOWED[package]
    ]
    assert not offenders, "imports must run twinformat <- twins <- converters:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_its_own_framework(package):
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {root}"
        for path in modules_of(package)
        for line, root in imported_roots(path)
        if root in FRAMEWORKS and root not in ALLOWED_FRAMEWORKS[package]
    ]
    assert not offenders, "\n".join(offenders)


def test_the_walk_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from converters.files import TensorFile\n    import torch\n")
    assert imported_roots(source) == [(2, "converters"), (3, "torch")]


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("twinformat", ("torch", "jax", "flax", "torch_impl", "flax_impl", "converters")),
        ("converters", ("torch", "jax", "flax")),
        ("torch_impl", ("jax", "flax", "converters", "flax_impl")),
        ("flax_impl", ("torch", "converters", "torch_impl")),
    ],
)
def test_importing_a_package_loads_no_framework_it_does_not_need(module, absent):
    import subprocess
    import sys

    _skip_without_framework(module)

    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_package_has_a_version_and_ships_py_typed():
    import importlib
    import importlib.util

    for package in PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package
        if all(importlib.util.find_spec(f) for f in NEEDS.get(package, ())):
            assert importlib.import_module(package).__version__, package


# The framework each twin needs to import at all (the single-framework CI environments lack one).
NEEDS = {"torch_impl": ("torch",), "flax_impl": ("jax", "flax")}


def _skip_without_framework(package: str) -> None:
    import importlib.util

    missing = [f for f in NEEDS.get(package, ()) if importlib.util.find_spec(f) is None]
    if missing:
        pytest.skip(f"{package} needs {missing}, not installed in this environment")
