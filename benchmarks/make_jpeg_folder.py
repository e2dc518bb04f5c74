"""A folder of JPEG files with smooth, photo-like content, generated on the spot (nothing downloaded).

For the GPU suite's JPEG training loop (``benchmarks/train_loop.py``): ``OUT/train/<class>/<n>.jpg`` and
``OUT/test/<class>/<n>.jpg`` in the layout of recallk's ``folder`` reader, the last ``--test-fraction`` of the
classes held out for the test split. Each class is a random low-frequency colour field (a coarse grid of random
colours, upsampled bicubically); each image mixes its class's field with its own field (weight ``--spread``), so
images of a class look alike without being copies, and JPEG files cost what photos of that size cost to decode.
Images are written by ``--workers`` processes; a folder already holding the requested images is kept.

    python benchmarks/make_jpeg_folder.py /tmp/jpegs --images 20000 --classes 1000    # 500 x 375 px, quality 90
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

GRID = (6, 8)  # rows, columns of the coarse colour field (low frequencies only)


def class_field(seed: int, label: int) -> np.ndarray:
    """The coarse colour grid ``(rows, columns, 3)`` of class ``label``, values in 0-255."""
    return np.random.default_rng([seed, label]).uniform(0, 255, (*GRID, 3))


def photo_like_image(seed: int, label: int, index: int, size: tuple[int, int], spread: float) -> Image.Image:
    """Image ``index`` of class ``label``: the class field mixed with the image's own field, upsampled to ``size``
    (width, height) with bicubic interpolation, plus mild noise (JPEG-like texture)."""
    rng = np.random.default_rng([seed, label, index])
    grid = (1 - spread) * class_field(seed, label) + spread * rng.uniform(0, 255, (*GRID, 3))
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    smooth = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0, 4, smooth.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write(job: tuple[Path, int, int, int, tuple[int, int], float, int]) -> None:
    path, seed, label, index, size, spread, quality = job
    path.parent.mkdir(parents=True, exist_ok=True)
    photo_like_image(seed, label, index, size, spread).save(path, quality=quality)


def make_folder(
    out: Path, images: int, classes: int, size: tuple[int, int] = (500, 375), test_fraction: float = 0.2,
    spread: float = 0.35, quality: int = 90, seed: int = 0, workers: int | None = None,
) -> dict:
    """Write the folder (skipped when ``out/manifest.json`` records the same request); returns the manifest."""
    if images < 2 * classes:
        raise SystemExit(f"--images {images} gives fewer than 2 images per class of --classes {classes}")
    request = {"images": images, "classes": classes, "size": list(size), "test_fraction": test_fraction,
               "spread": spread, "quality": quality, "seed": seed}  # fmt: skip
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("request") == request:
        return json.loads(manifest.read_text())
    test_classes = max(1, round(classes * test_fraction))
    jobs = []
    for label in range(classes):
        split = "test" if label >= classes - test_classes else "train"
        count = images // classes + (label < images % classes)
        jobs += [(out / split / f"class_{label:04d}" / f"{n:03d}.jpg", seed, label, n, size, spread, quality)
                 for n in range(count)]  # fmt: skip
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    record = {"request": request, "train_classes": classes - test_classes, "test_classes": test_classes,
              "files": len(jobs), "bytes": sum(job[0].stat().st_size for job in jobs)}  # fmt: skip
    manifest.write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of the classes in the test split")
    parser.add_argument("--spread", type=float, default=0.35, help="weight of each image's own field (0: copies)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, help="writing processes (default: one per CPU)")
    args = parser.parse_args()
    record = make_folder(args.out, args.images, args.classes, tuple(args.size), args.test_fraction, args.spread,
                         args.quality, workers=args.workers)  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
