"""The code blocks of the documentation pages (docs/*.md and README.md), and the convention that says which run.

A fenced block runs in the docs tests when:

- its language is ``python``, unless the line before it is ``<!-- docs-test: skip, REASON -->`` (REASON names the
  test that runs it instead, or why it cannot run here);
- its language is ``bash`` and the line before it is ``<!-- docs-test: run -->``.

A block with a title (```` ```yaml title="my_images.yaml" ````) is written to that file first, whatever its
language, so that the blocks after it can use the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
_DIRECTIVE = re.compile(r"^<!-- docs-test: (?P<directive>.*?) -->$")
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, first line (1-based, the fence), language, title, directive and text."""

    page: Path
    line: int
    lang: str
    title: str | None
    directive: str | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runs(self) -> bool:
        """Whether the docs tests execute this block (see the module doc); a malformed directive raises."""
        if self.directive is not None and self.directive != "run" and not re.match(r"skip, \S", self.directive):
            raise ValueError(f"{self.where}: unknown directive {self.directive!r}; use 'run' or 'skip, REASON'")
        if self.lang == "python":
            return self.directive is None or self.directive == "run"
        return self.lang == "bash" and self.directive == "run"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` in order (fences at the start of a line, not indented)."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            info = lines[i][3:].strip()
            lang = info.split()[0] if info else ""
            title = _TITLE.search(info)
            directive = _DIRECTIVE.match(lines[i - 1]) if i > 0 else None
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```")
            found.append(Block(page, i + 1, lang, title["title"] if title else None,
                               directive["directive"] if directive else None, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return found


def python_block(page: Path, heading: str) -> str:
    """The text of the first ```python block after the line ``heading`` of ``page``."""
    after = [b for b in blocks(page) if b.lang == "python" and b.line > _line_of(page, heading)]
    assert after, f"no python block under {heading!r} in {page}"
    return after[0].body


def _line_of(page: Path, heading: str) -> int:
    lines = page.read_text().splitlines()
    assert heading in lines, f"{page} has no line {heading!r}"
    return lines.index(heading) + 1
