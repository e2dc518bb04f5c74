"""MkDocs hooks (``hooks:`` in mkdocs.yml): the parts of the documentation site that are generated at build time.

- ``<!-- recallk:config-reference -->`` in a page becomes the reference of every config key, rendered from the
  text of :func:`recallk.config.explain_config` (what ``recallk config --explain`` prints), so it cannot drift;
  ``<!-- recallk:recipes -->`` the table of bundled recipes (:func:`recallk.recipes.list_recipes`).
- ``benchmarks/full.md`` is BENCHMARKS.md itself, with its figures from ``benchmarks/results/``.
- Sphinx roles in docstrings (``:func:`name` ``) are shown as plain code in the API pages.
- ``assets/generated/*.png`` are the plots of a tiny training run made during the build (:func:`train_tiny_run`),
  so the pictures in the guides are what the code draws today.
"""

from __future__ import annotations

import html
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MARKER = "<!-- recallk:config-reference -->"
RECIPES_MARKER = "<!-- recallk:recipes -->"
GENERATED_PLOTS = ("training_curves.png", "recall_at_k.png", "retrievals_test.png")
_KEY_LINE = re.compile(r"^  (?P<key>[\w.]+): (?P<rest>.*)$")
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>~?")


def config_reference_markdown() -> str:
    """Every config key as one table per section, parsed from ``explain_config()``'s text (key, type, default,
    meaning); raises if a line does not have the shape ``explain_config`` documents."""
    from recallk.config import explain_config

    out: list[str] = []
    for block in explain_config().split("\n\n"):
        header, *lines = block.splitlines()
        section, _, title = header.partition("] ")
        out += [f"## `{section.lstrip('[')}`", "", _rst_to_markdown(title), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for key_line, help_line in zip(lines[::2], lines[1::2]):
            match = _KEY_LINE.match(key_line)
            if match is None or " (default: " not in match["rest"]:
                raise ValueError(f"explain_config() printed an unexpected line: {key_line!r}")
            kind, _, default = match["rest"].rpartition(" (default: ")
            cells = [f"`{match['key']}`", _cell(kind), f"`{default[:-1]}`", _cell(_rst_to_markdown(help_line.strip()))]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def recipes_markdown() -> str:
    """The bundled recipes as a table: name and the first comment line of the file."""
    from recallk.recipes import list_recipes

    rows = [f"| `{name}` | {_cell(_rst_to_markdown(summary))} |" for name, summary in list_recipes().items()]
    return "\n".join(["| recipe | what it trains |", "|---|---|", *rows])


def _rst_to_markdown(text: str) -> str:
    return text.replace("``", "`")


def _cell(text: str) -> str:
    """Markdown table cell: ``|`` escaped, ``<``/``>``/``&`` escaped outside `code` spans (kept as is inside)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else html.escape(part, quote=False) for i, part in enumerate(parts))


def train_tiny_run(folder: Path) -> Path:
    """Train recallk's small CNN for 6 epochs on generated glyphs (tests/data_fixtures.py), with plots; a few
    seconds on a CPU. Returns the run directory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from recallk.config import config_from_dict
    from recallk.training.trainer import train

    from data_fixtures import write_glyphs

    write_glyphs(folder / "data" / "train", range(10), per_class=6, seed=1)
    write_glyphs(folder / "data" / "test", range(10, 18), seed=2)
    config = config_from_dict({
        "name": "docs", "seed": 5,
        "data": {"dataset": "folder", "split_train": "train", "split_val": "test", "split_test": ["test"],
                 "image_size": 16, "transform": "omniglot", "batch_size": 20, "samples_per_class": 2,
                 "num_workers": 0},
        "model": {"backbone": "omniglot_cnn", "widths": [8, 16], "embed_dim": 12, "pooling": "gem",
                  "freeze_batchnorm": True},
        "loss": {"name": "rsk", "k": [1, 2, 4]},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 6, "chunk_size": 10, "device": "cpu"},
        "eval": {"k": [1, 2, 4], "batch_size": 32},
        "output": {"runs_root": str(folder), "plots": True},
    })
    run = folder / "run"
    train(config, run, data_dir=folder / "data", progress=False)
    return run


def on_files(files: Files, config: Any) -> Files:
    """Add BENCHMARKS.md with its figures, and the plots of a tiny run trained now."""
    text = (ROOT / "BENCHMARKS.md").read_text().replace("](benchmarks/results/", "](results/")
    files.append(File.generated(config, "benchmarks/full.md", content=text))
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{png.name}", content=png.read_bytes()))
    with tempfile.TemporaryDirectory(prefix="recallk-docs-") as folder:
        run = train_tiny_run(Path(folder))
        for name in GENERATED_PLOTS:
            files.append(File.generated(config, f"assets/generated/{name}",
                                        content=(run / "plots" / name).read_bytes()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference_markdown())
    if RECIPES_MARKER in markdown:
        markdown = markdown.replace(RECIPES_MARKER, recipes_markdown())
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """``:func:<code>x</code>`` (a Sphinx role of a docstring, rendered by mkdocstrings) -> ``<code>x</code>``."""
    return _SPHINX_ROLE.sub("<code>", html)
