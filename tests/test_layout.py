"""House rules kept as tests: the fixed layout and the direction of imports."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("recsys", "features", "models", "serving", "pipelines")
# Who may import whom (STYLE.md): recsys <- features <- models <- pipelines, serving.
ALLOWED = {
    "recsys": set(),
    "features": {"recsys"},
    "models": {"recsys", "features"},
    "pipelines": {"recsys", "features", "models"},
    "serving": {"recsys", "features", "models"},
}
EDGES = {"recsys/cli.py": set(PACKAGES)}  # the command line dispatches to every package
NO_RAY = ("recsys", "features", "models")


def modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield pkg, path


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_layout():
    for d in (*PACKAGES, "tests", "configs", "docs"):
        assert (ROOT / d).is_dir(), d
    for f in ("pyproject.toml", "Makefile", "README.md", ".ci/run"):
        assert (ROOT / f).is_file(), f


@pytest.mark.parametrize(("pkg", "path"), list(modules()), ids=lambda x: str(x).split("/main/")[-1])
def test_imports_go_one_way(pkg, path):
    rel = path.relative_to(ROOT).as_posix()
    allowed = EDGES.get(rel, ALLOWED[pkg]) | {pkg}
    used = imported_packages(path) & set(PACKAGES)
    assert used <= allowed, f"{rel} imports {sorted(used - allowed)}"
    if pkg in NO_RAY:
        assert "ray" not in imported_packages(path), f"{rel} imports ray (only pipelines/ and serving/ may)"


@pytest.mark.parametrize(("pkg", "path"), list(modules()), ids=lambda x: str(x).split("/main/")[-1])
def test_docstring_examples_run(pkg, path):
    name = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
