"""The layout is the process map (docs/development.md): a package per process kind, the host's
internals in host/ alone, and the tests independent of the benchmarks. pyproject.toml's import
contracts (lint-imports, in .ci/run) hold the imports between packages; these hold what the
contracts cannot name."""

from __future__ import annotations

import ast
from pathlib import Path

from tools.servers import REPO

PACKAGE = REPO / "blip_serve"
PRIVATE_MODULES = ("bentoml._internal", "_bentoml_impl", "_bentoml_sdk", "uvicorn", "circus")
PRIVATE_NAMES = ("BENTOML_RUNNER_MAP", "force_exit", "handle_exit")


def python_files(*roots: Path) -> list[Path]:
    return [path for root in roots for path in ([root] if root.is_file() else sorted(root.rglob("*.py")))]


def imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def private_touches(path: Path) -> list[str]:
    """The private BentoML/uvicorn/circus modules `path` imports and the private names its code
    (not its comments or docstrings) uses."""
    tree = ast.parse(path.read_text())
    touches = [m for m in imported_modules(tree) if m.startswith(PRIVATE_MODULES)]
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        else:
            continue
        if any(name in text for name in (*PRIVATE_NAMES, "_bentoml_", "bentoml._internal")):
            touches.append(text)
    return touches


def test_only_host_touches_bentomls_uvicorns_or_circuss_internals():
    outside = [p for p in python_files(PACKAGE, REPO / "service.py") if "host" not in p.relative_to(REPO).parts]
    found = {str(p.relative_to(REPO)): private_touches(p) for p in outside}
    assert {path: touches for path, touches in found.items() if touches} == {}
    inside = {str(p.relative_to(REPO)): private_touches(p) for p in python_files(PACKAGE / "host")}
    assert sum(map(len, inside.values())) >= 5  # the check sees them where they are


def test_the_package_is_the_process_map():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "api", "client", "decoding", "formats.py", "host", "model", "shared"]
    for package in ("api", "client", "decoding", "host", "model", "shared"):
        assert ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())), package


def test_the_tests_do_not_import_the_benchmarks():
    importing = [
        str(path.relative_to(REPO))
        for path in python_files(REPO / "tests")
        if any(m == "load_test" or m.startswith("load_test.") for m in imported_modules(ast.parse(path.read_text())))
    ]
    assert importing == []


def test_the_unit_tests_mirror_the_packages():
    unit = REPO / "tests" / "unit"
    for package in ("api", "client", "decoding", "host", "model", "shared"):
        assert list((unit / package).glob("test_*.py")), package
    assert sorted(p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"
    )
