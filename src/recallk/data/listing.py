"""Helpers shared by the readers: finding a data set's folder, checking split names, reading list files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recallk.errors import RecallkUsageError


def check_split(dataset: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"unknown {dataset} split {split!r}; expected one of {tuple(splits)}")


def locate(root: str | Path, candidates: Sequence[str], subdir: str, dataset: str) -> tuple[Path, str]:
    """Find the data set folder: ``root`` or ``root/subdir``, whichever holds one of ``candidates`` (relative paths).

    Returns ``(folder, candidate found)``; raises ``FileNotFoundError`` naming every place looked at.
    """
    root = Path(root)
    for base in (root, root / subdir):
        for rel in candidates:
            if (base / rel).is_file():
                return base, rel
    looked = ", ".join(str(base / rel) for base in (root, root / subdir) for rel in candidates)
    raise FileNotFoundError(
        f"{dataset} split file not found (looked for {looked}); download and extract {dataset} so that "
        f"{root / subdir / candidates[0]} exists, or pass the folder holding {candidates[0]} as root"
    )


def read_rows(path: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of ``path`` after ``skip`` header lines, each with exactly ``columns`` fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if number <= skip or not fields:
                continue
            if len(fields) != columns:
                raise ValueError(
                    f"{path} line {number}: expected {columns} fields, got {len(fields)}: {line.strip()!r}"
                )
            rows.append(fields)
    return rows


def class_keys(texts: Sequence[str]) -> list[int] | list[str]:
    """Class ids as ints when every one is all digits (so they sort numerically), else the texts unchanged."""
    if all(t.isdigit() for t in texts):
        return [int(t) for t in texts]
    return list(texts)


def read_path_list(path: str | Path, what: str = "image list") -> list[Path]:
    """The files a list file names, one a line (blank lines skipped), relative to the list file's folder or absolute;
    a missing list or listed file is a one-line error naming it (``what`` says what the list is)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecallkUsageError(f"{what} {path} does not exist; pass a text file with one image path a line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    files = [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines if line]
    for file in files:
        if not file.is_file():
            raise RecallkUsageError(f"image {file} listed in {what} {path} does not exist; restore it or fix the list")
    if not files:
        raise RecallkUsageError(f"{what} {path} lists no file; write one image path a line")
    return files
