"""A tiny Revisited Oxford / Paris tree in the exact official layout (revisitop): JPEGs + the gnd pickle.

Three synthetic "landmarks" (a few thick strokes in a colour of their own) are drawn at a jittered position on
noisy backgrounds. Each has database photos (2 easy, 1 hard: smaller and fainter, 1 junk: a sliver) and one query
photo whose box holds the landmark; two plain noise images are negatives. The pickle holds ``imlist``,
``qimlist`` (names without ``.jpg``) and ``gnd`` (``bbx`` as float x1, y1, x2, y2; ``easy``/``hard``/``junk`` as
numpy arrays, as the official files mix lists and arrays).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

LANDMARKS = 3
SIZE = (48, 40)  # width, height of every database image
QUERY_SIZE = (64, 48)


def _landmark(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    strokes = rng.uniform(0, 20, (3, 4))
    colour = tuple(int(c) for c in rng.integers(60, 255, 3))
    return strokes, colour


def _photo(
    rng: np.random.Generator, size: tuple[int, int], landmark: tuple[np.ndarray, tuple[int, int, int]] | None,
    at: tuple[float, float], scale: float = 1.0, faint: float = 1.0,
) -> Image.Image:
    noise = rng.integers(0, 50, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    if landmark is not None:
        strokes, colour = landmark
        draw = ImageDraw.Draw(image)
        ink = tuple(int(c * faint) for c in colour)
        for x0, y0, x1, y1 in strokes * scale + rng.normal(0, 0.5, strokes.shape):
            draw.line((at[0] + x0, at[1] + y0, at[0] + x1, at[1] + y1), fill=ink, width=3)
    return image


def write_revisited(root: Path, name: str = "roxford5k", seed: int = 0) -> dict[str, Any]:
    """``root/<name>/jpg/*.jpg`` + ``root/<name>/gnd_<name>.pkl``; returns the pickle's content."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    landmarks = [_landmark(rng) for _ in range(LANDMARKS)]
    imlist: list[str] = []
    kinds: list[tuple[int, str]] = []
    for c, landmark in enumerate(landmarks):
        for kind, scale, faint in (("easy", 1.0, 1.0), ("easy", 1.0, 0.9), ("hard", 0.7, 0.6), ("junk", 0.3, 0.4)):
            image = _photo(rng, SIZE, landmark, at=rng.uniform(2, 20, 2), scale=scale, faint=faint)
            imlist.append(f"{name}_{c}_{len(imlist)}")
            kinds.append((c, kind))
            image.save(folder / "jpg" / f"{imlist[-1]}.jpg", quality=95)
    for n in range(2):
        imlist.append(f"{name}_noise_{n}")
        kinds.append((-1, "none"))
        _photo(rng, SIZE, None, (0, 0)).save(folder / "jpg" / f"{imlist[-1]}.jpg", quality=95)
    qimlist, gnd = [], []
    for c, landmark in enumerate(landmarks):
        x, y = rng.uniform(6, 30, 2)
        image = _photo(rng, QUERY_SIZE, landmark, at=(x, y))
        qimlist.append(f"{name}_query_{c}")
        image.save(folder / "jpg" / f"{qimlist[-1]}.jpg", quality=95)
        gnd.append({
            "bbx": [float(x - 2), float(y - 2), float(min(x + 24, QUERY_SIZE[0])), float(min(y + 24, QUERY_SIZE[1]))],
            **{kind: np.array([i for i, (cls, k) in enumerate(kinds) if cls == c and k == kind])
               for kind in ("easy", "hard", "junk")},
        })
    content = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with (folder / f"gnd_{name}.pkl").open("wb") as handle:
        pickle.dump(content, handle)
    return content


def write_distractors(folder: Path, count: int, seed: int = 1) -> Path:
    """``count`` noise JPEGs under ``folder/jpg/`` and ``folder/distractors.txt`` listing them (relative paths)."""
    rng = np.random.default_rng(seed)
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(count):
        _photo(rng, SIZE, None, (0, 0)).save(folder / "jpg" / f"d{n}.jpg", quality=95)
        lines.append(f"jpg/d{n}.jpg")
    (folder / "distractors.txt").write_text("\n".join(lines) + "\n")
    return folder / "distractors.txt"
