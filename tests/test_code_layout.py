"""The code stays easy to enter: every public name has a docstring, and the layers of design.md hold.

Read from the source with `ast` (nothing is imported), so the checks take milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dptool", "cli", "kernels")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)


def _public_without_docstring(tree: ast.Module) -> list[str]:
    """Public functions, classes and methods (no leading underscore, dunders aside) that have no docstring."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_"):  # private, or a dunder whose meaning Python defines
                continue
            if ast.get_docstring(child) is None:
                found.append(f"{prefix}{child.name} (line {child.lineno})")
            if isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(tree, "")
    return found


@pytest.mark.parametrize("path", _modules(*PACKAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_public_names_have_docstrings(path):
    missing = _public_without_docstring(ast.parse(path.read_text()))
    assert not missing, f"{path.relative_to(ROOT)}: no docstring on {', '.join(missing)}"


def _imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Absolute names of every module `tree` imports (relative imports resolved inside `package`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("path", _modules("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_no_models_and_no_library(path):
    """kernels/ holds array kernels only: no torch models, and from the library only its error types."""
    imported = _imported_modules(ast.parse(path.read_text()), "dptool.kernels")
    library = {m for m in imported if m.startswith("dptool.") and not m.startswith("dptool.kernels")}
    assert library <= {"dptool.errors"}, f"{path.name} imports {sorted(library)}"
    assert not {m for m in imported if m.startswith(("torch.nn", "torchvision"))}, path.name


@pytest.mark.parametrize("path", _modules("dptool", "kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_the_cli(path):
    """Data flows one way: the CLI calls the library, never the reverse (`python -m dptool` aside)."""
    if path == ROOT / "dptool" / "__main__.py":
        return
    package = "dptool" if path.parent.name == "dptool" else f"dptool.{path.parent.name}"
    imported = _imported_modules(ast.parse(path.read_text()), package)
    assert not {m for m in imported if m == "dptool.cli" or m.startswith("dptool.cli.")}, path.name


def test_every_package_folder_is_installed():
    """A non-editable install (`pip install .`, a wheel) holds only the packages pyproject.toml lists: a sub-package
    left out (dptool.scoring was) imports from a checkout but not once installed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setup["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                rel = init.parent.relative_to(folder).parts
                found.add(".".join((name, *rel)))
    assert found == set(setup["packages"]), f"pyproject.toml packages should be {sorted(found)}"
