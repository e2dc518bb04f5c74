"""The documentation site: ``mkdocs build --strict`` succeeds with its generated parts, every example that the
docs say runs does run (tests/docs_blocks.py has the convention), and the README's links into the site hold."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_type_hints

import pytest
from PIL import Image

from data_fixtures import write_glyphs
from docs_blocks import DOCS, REPO, Block, blocks

PAGES = sorted([*DOCS.rglob("*.md"), REPO / "README.md"])
TEST_ANIMALS = ("fox", "owl", "elk", "yak", "emu", "gnu")  # getting-started's photos/test/<class> names


def _photos(folder: Path, trained_run: Path) -> None:
    """``photos/{train,test}/<class>/<i>.png``: the trained run's glyph data, test classes named as in the page."""
    shutil.copytree(trained_run.parent / "data", folder / "photos")
    for old, new in zip(sorted((folder / "photos" / "test").iterdir()), TEST_ANIMALS):
        old.rename(old.parent / new)


def _run_as(name: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, trained_run: Path) -> None:
        shutil.copytree(trained_run, folder / "runs" / name)
    return setup


def _getting_started(folder: Path, trained_run: Path) -> None:
    _photos(folder, trained_run)
    _run_as("my-images")(folder, trained_run)


def _trained_model(folder: Path, trained_run: Path) -> None:
    _run_as("demo")(folder, trained_run)
    images = sorted((trained_run.parent / "data" / "test").rglob("*.png"))
    for name, source in zip(("query.png", "a.png", "b.png", "c.png"), (images[0], images[0], images[5], images[10])):
        Image.open(source).save(folder / name)


def _data(folder: Path, trained_run: Path) -> None:
    _photos(folder, trained_run)
    write_glyphs(folder / "lists" / "images", range(3), per_class=2)
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((folder / "lists").rglob("*.png"))]
    (folder / "lists" / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")


# What each page's examples find in their working folder (every other page: an empty folder).
PAGE_SETUP: dict[str, Callable[[Path, Path], None]] = {
    "docs/getting-started.md": _getting_started,
    "docs/guide/training.md": _run_as("tiny"),
    "docs/guide/trained-model.md": _trained_model,
    "docs/guide/data.md": _data,
}
RUNNABLE = [page for page in PAGES if any(block.runs for block in blocks(page))]


def _run_block(block: Block, namespace: dict, folder: Path) -> None:
    if block.lang == "python":
        exec(compile(block.body, block.where, "exec"), namespace)  # the docs' own examples, in the page's namespace
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.body], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(REPO)) for p in RUNNABLE])
def test_the_examples_of_each_page_run_in_order(page: Path, trained_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    key = str(page.relative_to(REPO))
    if key in PAGE_SETUP:
        PAGE_SETUP[key](tmp_path, trained_run)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(page):
        if block.title:
            (tmp_path / block.title).write_text(block.body)
        if block.runs:
            _run_block(block, namespace, tmp_path)


def test_block_convention_is_followed_everywhere() -> None:
    """Every directive is a known one, and every skipped block names why; a python block in a page is a test."""
    for page in PAGES:
        for block in blocks(page):
            assert isinstance(block.runs, bool)  # raises on an unknown directive
    assert len(RUNNABLE) >= 8, [str(p) for p in RUNNABLE]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return out


def test_the_site_builds_strictly_with_its_generated_parts(site: Path) -> None:
    from recallk.config import Config

    reference = (site / "reference" / "config" / "index.html").read_text()
    hints = get_type_hints(Config)
    keys = [f.name for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
    for section in (f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])):
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(hints[section.name])]
    missing = [key for key in keys if f"<code>{key}</code>" not in reference]
    assert not missing and len(keys) > 60, missing
    for plot in ("training_curves.png", "recall_at_k.png", "retrievals_test.png"):
        with Image.open(site / "assets" / "generated" / plot) as image:
            assert image.width > 300  # a real plot drawn by the build, not a placeholder
    assert "<code>omniglot_efficientnet_lite0</code>" in (site / "guide" / "training" / "index.html").read_text()
    assert "GPU suite: one NVIDIA H200" in (site / "benchmarks" / "full" / "index.html").read_text()
    api = (site / "reference" / "api" / "losses" / "index.html").read_text()
    assert 'id="recallk.losses.RecallAtKLoss"' in api and "the recall levels averaged by the loss" in api


def _anchors(page: Path) -> set[str]:
    from pymdownx.slugs import slugify

    slug = slugify(case="lower")
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {slug(re.sub(r"`", "", heading), "-") for heading in headings}


def test_readme_is_the_landing_page_and_its_links_hold() -> None:
    text = (REPO / "README.md").read_text()
    assert text.startswith(
        "# recallk\n\n```bash\n"
        "make demo   # creates .venv, installs recallk, trains on Omniglot on the CPU and prints recall@k"
        " before/after\n"
        "make test   # creates .venv, installs recallk with its test extras, runs the whole test suite\n```\n"
    )
    assert len(text.splitlines()) < 150
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len([link for link in local if link.startswith("docs/")]) >= 8, local
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.is_file(), f"README links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"README links to {link}: no such heading"
