"""The recipes installed with recallk (``recallk/configs/*.yaml``): listing them, finding one by name, copying one.

``recallk train omniglot`` trains the bundled ``omniglot.yaml``; ``recallk recipes`` lists them and
``recallk recipes --copy omniglot DIR`` writes one out to edit.
"""

from __future__ import annotations

import difflib
import shutil
from importlib import resources
from pathlib import Path

from recallk.errors import RecallkUsageError


def recipes_dir() -> Path:
    """The folder of the bundled YAML recipes inside the installed package."""
    return Path(str(resources.files("recallk") / "configs"))


def list_recipes() -> dict[str, str]:
    """``{name: summary}`` of every bundled recipe, sorted by name; the summary is the file's first comment line
    (or empty)."""
    recipes = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        recipes[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return recipes


def recipe_path(name: str) -> Path:
    """The bundled recipe called ``name`` (with or without ``.yaml``); an unknown name lists the known ones."""
    stem = name.removesuffix(".yaml")
    path = recipes_dir() / f"{stem}.yaml"
    if not path.is_file():
        names = list(list_recipes())
        close = difflib.get_close_matches(stem, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecallkUsageError(
            f"no bundled recipe named '{name}'; {hint}bundled recipes: {', '.join(names)} (see 'recallk recipes')"
        )
    return path


def is_recipe_name(text: str) -> bool:
    """Whether ``text`` looks like a recipe name rather than a path: no folder separator, and no ``.yaml``/``.yml``
    suffix unless a bundled recipe has that file name (``my_recipe.yaml`` is a missing file, not a missing recipe)."""
    if "/" in text or "\\" in text:
        return False
    return not text.endswith((".yaml", ".yml")) or (recipes_dir() / text).is_file()


def copy_recipe(name: str, directory: str | Path) -> Path:
    """Copy the bundled recipe ``name`` into ``directory`` (created if needed); refuses to overwrite a file."""
    source = recipe_path(name)
    directory = Path(directory)
    target = directory / source.name
    if target.exists():
        raise RecallkUsageError(f"{target} already exists; remove it or copy into another directory")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
