"""The floor plan: imports inside recallk only go down the layers (also lazy imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "recallk"

# Layer of each top-level module or package of recallk; a module may import its own layer and the ones below.
LAYERS = {
    "errors": 0, "registry": 0, "_typed_yaml": 0, "files": 0, "config": 0, "losses": 0, "engine": 0,
    "data": 1, "models": 1,
    "evaluation": 2, "integrations": 2,
    "training": 3,
    "pretrained": 4, "inference": 4, "recipes": 4, "demo": 4, "cli": 4, "__main__": 4, "__init__": 4,
}


def _part(module: str) -> str:
    """``recallk.data.sources`` -> ``data``; ``recallk`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported recallk module) of every import statement in ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = "recallk." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "recallk"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = here.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "recallk":
                if name == "recallk":
                    found += [(node.lineno, f"recallk.{alias.name}") for alias in node.names]
                else:
                    found.append((node.lineno, name))
    return found


def _upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            target = _part(module)
            if target == "__version__":
                continue  # recallk.__version__ is a constant of the package itself
            if LAYERS[target] > LAYERS[own]:
                problems.append(f"{relative}:{line} imports {module} (layer {LAYERS[target]} > {LAYERS[own]})")
    return problems


def test_every_module_has_a_layer() -> None:
    top_level = {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert top_level == set(LAYERS)


def test_imports_only_go_down() -> None:
    assert _upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk finds a lazy upward import inside a function (so the test above can fail)."""
    fake = tmp_path / "recallk"
    (fake / "losses").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "losses" / "bad.py").write_text("def f():\n    from recallk.training import trainer\n")
    (fake / "training" / "good.py").write_text("from ..losses import bad\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert _upward_imports() == ["losses/bad.py:2 imports recallk.training (layer 3 > 0)"]
