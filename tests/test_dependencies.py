"""Every distribution the code imports is declared in pyproject.toml: module-level imports of the package in
``dependencies``, imports inside functions (optional features such as wandb) in ``dependencies`` or an extra, and
the tests' imports in ``dependencies`` or the ``test`` extra. An undeclared import works on the developer's machine
and fails on a user's fresh install."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from functools import cache
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imports(source: str) -> list[tuple[str, bool]]:
    """``(top-level module, at module level)`` for every absolute import in a source text."""
    tree = ast.parse(source)
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        found += [(m.split(".")[0], id(node) not in nested) for m in mods]
    return found


@cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


# this repository's own modules: the package, the tests, and the bench scripts (tests import them from bench/)
FIRST_PARTY = {"tune_agb", "tests", "__future__", *(p.stem for p in (REPO / "bench").glob("*.py"))}


def undeclared(source: str, allowed_top: set[str], allowed_nested: set[str]) -> list[str]:
    """The imports of ``source`` whose distribution is not in the allowed sets (first-party and stdlib excepted)."""
    dists = _distributions()
    bad = []
    for mod, top in imports(source):
        if mod in sys.stdlib_module_names or mod in FIRST_PARTY:
            continue
        owners = {_norm(d) for d in dists.get(mod, [mod])}
        allowed = allowed_top if top else allowed_top | allowed_nested
        if not owners & allowed:
            bad.append(f"{mod} ({', '.join(sorted(owners))}){'' if top else ' [inside a function]'}")
    return bad


def test_the_check_catches_an_undeclared_import() -> None:
    deps, extras = _declared()
    src = "import numpy\nimport wandb\ndef f():\n    import wandb\n    import pytest\n"
    # wandb at module level needs a core dependency; inside a function an extra will do; pytest is test-only
    assert undeclared(src, deps, extras["wandb"]) == ["wandb (wandb)", "pytest (pytest) [inside a function]"]


def test_package_imports_are_declared() -> None:
    deps, extras = _declared()
    optional = set().union(*(names for extra, names in extras.items() if extra != "test"))
    problems = {}
    for path in sorted((REPO / "tune_agb").rglob("*.py")):
        bad = undeclared(path.read_text(), deps, optional | deps)
        if bad:
            problems[str(path.relative_to(REPO))] = bad
    assert not problems, f"imports not declared in pyproject.toml: {problems}"


def test_test_imports_are_declared() -> None:
    deps, extras = _declared()
    allowed = deps | extras.get("test", set())
    problems = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        bad = undeclared(path.read_text(), allowed, allowed)
        if bad:
            problems[str(path.relative_to(REPO))] = bad
    assert not problems, f"test imports not declared in pyproject.toml (dependencies or the test extra): {problems}"
