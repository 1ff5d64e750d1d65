"""The import rules of DESIGN.md, checked on every module of every package.

Dependency direction: training -> export -> model repository <- serving; benchmarks
use the others' public interfaces and nothing depends on them. Serving never
imports torch (a serving host installs onnxruntime and nothing from training), and
common, which export and serving share, stays stdlib-only.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

PACKAGES = ("common", "training", "export", "serving", "benchmarks")
# package -> top-level modules it must never import, lazily or not
FORBIDDEN = {
    "serving": {"torch", "training", "export", "benchmarks"},
    "training": {"export", "serving", "benchmarks"},
    "export": {"serving", "benchmarks"},
    "common": {"training", "export", "serving", "benchmarks"},
}
# common may import these inside a function, for callers that have them installed (the
# ONNX Runtime session factory); at import time it needs the standard library only.
COMMON_LAZY = {"onnxruntime"}


def _imports(path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = {id(node) for scope in ast.walk(tree)
                   if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                   for node in ast.walk(scope)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) not in in_function) for name in names]
    return found


def _files(package: str):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, package
    return files


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_against_the_dependency_direction(package):
    violations = [f"{path.relative_to(REPO_ROOT)} imports {name}"
                  for path in _files(package) for name, _ in _imports(path) if name in FORBIDDEN[package]]
    assert not violations, violations


def test_common_is_stdlib_only():
    allowed = set(sys.stdlib_module_names) | {"__future__", "common"}
    violations = [f"{path.relative_to(REPO_ROOT)} imports {name}" + ("" if top_level else " in a function")
                  for path in _files("common") for name, top_level in _imports(path)
                  if name not in allowed and (top_level or name not in COMMON_LAZY)]
    assert not violations, violations


def _loaded_by_importing(modules: list[str]) -> set[str]:
    """Top-level names of the modules that importing `modules` (in a fresh interpreter) loads."""
    code = ("import importlib, sys\n"
            "before = set(sys.modules)\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def _modules(package: str) -> list[str]:
    parts = [path.relative_to(REPO_ROOT).with_suffix("").parts for path in _files(package)]
    return [".".join(p[:-1] if p[-1] == "__init__" else p) for p in parts]


def test_importing_every_serving_module_loads_no_torch_training_or_export():
    loaded = _loaded_by_importing(_modules("serving"))
    assert "serving" in loaded
    assert not loaded & FORBIDDEN["serving"]


def test_importing_common_loads_only_the_standard_library():
    loaded = _loaded_by_importing(_modules("common"))
    assert "common" in loaded
    assert loaded <= set(sys.stdlib_module_names) | {"common"}, loaded - set(sys.stdlib_module_names)


def test_files_copied_into_triton_models_import_only_what_a_python_backend_has():
    """model.py and the files copied verbatim beside it (the exit policies, the normalisation,
    the manifest schema, the session factory, the cascade's contract) run in Triton's Python
    backend, where the project is not importable: they import the standard library, numpy,
    triton_python_backend_utils, each other and (lazily) onnxruntime, torch or cupy."""
    from export.repository import CASCADE_MODEL_FILES, PYTHON_MODEL_FILES

    for files in (PYTHON_MODEL_FILES, CASCADE_MODEL_FILES):
        beside = {name.removesuffix(".py") for name in files}
        allowed = set(sys.stdlib_module_names) | {"__future__", "numpy", "triton_python_backend_utils"} | beside
        lazy = {"onnxruntime", "torch", "cupy"}
        violations = [f"{path} imports {name}" for path in files.values() for name, top_level in _imports(path)
                      if name not in allowed and (top_level or name not in lazy)]
        assert not violations, violations
