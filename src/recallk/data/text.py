"""Intent data sets for the text track (CLINC150, Banking77) with a class-disjoint retrieval protocol.

Protocol (the same for both): the in-scope intents, sorted by name, are shuffled with the fixed seed
``PROTOCOL_SEED`` and cut in two halves. The first half ("seen") trains, the second ("unseen") is only ever used
for the test retrieval, so the test measures generalisation to new intents as the image benchmarks do.

- ``train``: the official training sentences of the seen intents, minus ``val_classes`` of them;
- ``val``: ``val_classes`` seen intents (chosen with ``seed``) held out of training, with their official
  validation sentences (CLINC150) or training sentences (Banking77, which has no validation file);
- ``test``: the official test sentences of the unseen intents.

Files under the data root: ``clinc150/data_full.json`` (lists ``train``/``val``/``test`` of ``[text, intent]``;
the ``oos_*`` out-of-scope lists are not used) and ``banking77/{train,test}.csv`` (columns ``text,category``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recallk.data.paths import resolve_data_dir
from recallk.registry import TEXT_DATASETS

PROTOCOL_SEED = 0
TEXT_SPLITS = ("train", "val", "test")
DEFAULT_VAL_CLASSES = 10


@dataclass
class TextSplit:
    """One split: ``texts[i]`` has class ``labels[i]`` (int64, ``0..C-1`` in ``class_names`` order)."""

    texts: list[str]
    labels: np.ndarray
    item_ids: list[str]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


Rows = list[tuple[str, str, str]]  # (text, intent, item id)


def _missing(path: Path, name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} file {path} does not exist; put the data set under the data root (--data-dir, data.data_dir or "
        f"$RECALLK_DATA; now {path.parents[1]})"
    )


def _clinc150_rows(root: Path) -> dict[str, Rows]:
    path = root / "clinc150" / "data_full.json"
    if not path.is_file():
        raise _missing(path, "CLINC150")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            part: [(str(text), str(intent), f"{part}:{i}") for i, (text, intent) in enumerate(data[part])]
            for part in ("train", "val", "test")
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is not the CLINC150 data_full.json ({type(err).__name__}: {err}); it must be a JSON object "
            "with lists 'train', 'val' and 'test' of [text, intent] pairs"
        ) from None


def _banking77_rows(root: Path) -> dict[str, Rows]:
    parts: dict[str, Rows] = {}
    for part in ("train", "test"):
        path = root / "banking77" / f"{part}.csv"
        if not path.is_file():
            raise _missing(path, "Banking77")
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
                raise ValueError(f"{path} needs a header with columns text,category, got {reader.fieldnames}")
            parts[part] = [(row["text"], row["category"], f"{part}:{i}") for i, row in enumerate(reader)]
    parts["val"] = parts["train"]  # the held-out validation intents take their sentences from train.csv
    return parts


# The reader of each name in recallk.registry.TEXT_DATASETS.
TEXT_READERS: dict[str, Callable[[Path], dict[str, Rows]]] = {
    "clinc150": _clinc150_rows,
    "banking77": _banking77_rows,
}


def intent_halves(intents: list[str]) -> tuple[list[str], list[str]]:
    """(seen, unseen): the sorted ``intents`` shuffled with ``PROTOCOL_SEED``, first half and second half."""
    ordered = sorted(set(intents))
    order = np.random.default_rng(PROTOCOL_SEED).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    half = len(shuffled) // 2
    return sorted(shuffled[:half]), sorted(shuffled[half:])


def load_text_split(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    val_classes: int | None = None,
    seed: int = 0,
) -> TextSplit:
    """Split ``split`` (train, val or test) of text data set ``name`` (clinc150 or banking77); see the module doc.

    ``val_classes`` seen intents (default ``DEFAULT_VAL_CLASSES``) are held out of ``train`` as ``val``,
    chosen with ``seed``.
    """
    if name not in TEXT_READERS:
        raise ValueError(TEXT_DATASETS.unknown(name))
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown split {split!r} of {name}; choose one of {', '.join(TEXT_SPLITS)}")
    rows = TEXT_READERS[name](resolve_data_dir(data_dir))
    seen, unseen = intent_halves([intent for _, intent, _ in rows["train"]])
    count = DEFAULT_VAL_CLASSES if val_classes is None else val_classes
    if not 0 <= count < len(seen):
        raise ValueError(
            f"val_classes={count} must be between 0 and {len(seen) - 1} ({name} has {len(seen)} training intents)"
        )
    held_out = sorted(np.random.default_rng(seed).choice(seen, size=count, replace=False).tolist()) if count else []
    if split == "val" and not held_out:
        raise ValueError(f"the val split of {name} is empty with val_classes=0; set data.val_classes > 0")
    classes = {
        "train": sorted(set(seen) - set(held_out)),
        "val": held_out,
        "test": unseen,
    }[split]
    index = {intent: i for i, intent in enumerate(classes)}
    chosen = [row for row in rows[split] if row[1] in index]
    return TextSplit(
        texts=[text for text, _, _ in chosen],
        labels=np.array([index[intent] for _, intent, _ in chosen], dtype=np.int64),
        item_ids=[item for _, _, item in chosen],
        class_names=classes,
    )
