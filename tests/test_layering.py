"""The package's layers, held by reading every module's imports (no module is executed).

- The applications (``tdpipe_hf.apps``) sit on top: no core module imports them.
- The controller side (controller, policies, predictors) and the runtime side never import each
  other; ``tdpipe_hf.plan`` is the only thing they share.
- The shared vocabulary (``plan``, ``plugins``, ``protocols``, ``variants``) imports neither side's
  implementations: the registry names its built-ins as strings, loaded on first use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tdpipe_hf"
CONTROLLER_SIDE = ("controller", "policies", "predictors")
RUNTIME_SIDE = ("runtime",)
SHARED = ("tdpipe_hf.plan", "tdpipe_hf.plugins", "tdpipe_hf.protocols", "tdpipe_hf.variants")
SHARED_MAY_USE = ("tdpipe_hf.plan", "tdpipe_hf.plugins", "tdpipe_hf.protocols", "tdpipe_hf.predictors.base")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the tdpipe_hf modules ``path`` imports, at any depth of the file."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "tdpipe_hf" or name.startswith("tdpipe_hf.")}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_reader_sees_relative_and_absolute_imports():
    imports = imported_modules(PACKAGE / "apps" / "cli.py")
    assert any(name.startswith("tdpipe_hf.apps.") for name in imports)
    assert any(name.startswith("tdpipe_hf.models") for name in imports)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_layers(path):
    name = module_name(path)
    imports = imported_modules(path)
    own = layer(name)
    if own != "apps" and name not in ("tdpipe_hf", "tdpipe_hf.__main__"):
        assert not {m for m in imports if layer(m) == "apps"}, f"{name} imports an application"
    if own in CONTROLLER_SIDE:
        assert not {m for m in imports if layer(m) in RUNTIME_SIDE}, f"{name} imports the runtime"
    if own in RUNTIME_SIDE:
        assert not {m for m in imports if layer(m) in CONTROLLER_SIDE}, f"{name} imports the controller side"


@pytest.mark.parametrize("name", SHARED)
def test_shared_vocabulary_imports_no_implementation(name):
    path = PACKAGE / f"{name.split('.')[1]}.py"
    imports = imported_modules(path)
    allowed = {m for m in imports if m in SHARED_MAY_USE or m == "tdpipe_hf"
               or any(m.startswith(f"{ok}.") for ok in SHARED_MAY_USE)}
    assert imports <= allowed, f"{name} imports {sorted(imports - allowed)}"
