"""Readers for the landmark training sets: retrieval-SfM-120k (Radenović et al.) and Google Landmarks v2 clean.

Labels are landmarks (SfM-120k: the 3D model an image was reconstructed in; GLDv2: ``landmark_id``), numbered
``0..C-1`` in ascending order of the original id. Landmarks with fewer than ``min_images`` images are dropped, and
the reader logs how many: the class-balanced sampler would otherwise repeat their images to fill
``data.samples_per_class`` (``recallk train`` sets ``min_images`` to ``data.samples_per_class`` unless
``data.options.min_images`` says otherwise).

Neither data set can be fetched by recallk (its hosts publish no checksums); the missing-file errors say where to
get them.
"""

from __future__ import annotations

import csv
import logging
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from recallk.data.image_dataset import ImageDataset, encode_labels
from recallk.data.listing import check_split
from recallk.data.stores import DirectoryStore

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any] | None

SFM120K = "retrieval-SfM-120k"
SFM120K_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train"
SFM120K_FILES = (f"{SFM120K_URL}/dbs/{SFM120K}.pkl", f"{SFM120K_URL}/dbs/{SFM120K}-whiten.pkl",
                 f"{SFM120K_URL}/ims/ims.tar.gz")
GLDV2_URL = "https://github.com/cvdfoundation/google-landmark"
_SFM_KEYS = ("cids", "cluster", "qidxs", "pidxs")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, strings, numbers, numpy arrays): no other class is ever built."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "set"), ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}: the file must hold plain data")


def read_plain_pickle(path: Path) -> Any:
    """The plain data in pickle ``path`` (see :class:`_PlainUnpickler`); errors name the file."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read {path} ({err}); download it again") from None


def sfm120k_image(cid: str) -> str:
    """Path of image ``cid`` under the ``ims`` folder: ``<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>`` (no suffix)."""
    return f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"


def _sfm120k_folder(root: str | Path) -> Path:
    root = Path(root)
    for base in (root, root / SFM120K, root / "train" / SFM120K):
        if (base / f"{SFM120K}.pkl").is_file():
            return base
    raise FileNotFoundError(
        f"{SFM120K}.pkl not found in {root}, {root / SFM120K} or {root / 'train' / SFM120K}; download "
        f"{', '.join(SFM120K_FILES)} (extract ims.tar.gz into ims/) into {root / 'train' / SFM120K}"
    )


def _sfm120k_part(path: Path, part: str, keys: Sequence[str]) -> dict[str, Any]:
    db = read_plain_pickle(path)
    if part:
        if not isinstance(db, dict) or part not in db:
            found = sorted(db) if isinstance(db, dict) else type(db).__name__
            raise ValueError(f"{path} has no part {part!r} (found {found}); use the official {path.name}")
        db = db[part]
    missing = [k for k in keys if not isinstance(db, dict) or k not in db]
    if missing:
        raise ValueError(f"{path} part {part or '(top level)'!r} lacks {', '.join(missing)}; use the official "
                         f"{path.name}")
    return db


def _drop_small(names: list[str], keys: list[Any], min_images: int, dataset: str, split: str) -> tuple[list, list]:
    counts = Counter(keys)
    small = {k for k, n in counts.items() if n < min_images}
    if small:
        dropped = sum(counts[k] for k in small)
        logger.warning(
            "%s %s: dropped %d of %d landmarks (%d images) with fewer than %d images (min_images)",
            dataset, split, len(small), len(counts), dropped, min_images,
        )
    kept = [(n, k) for n, k in zip(names, keys) if k not in small]
    if not kept:
        raise ValueError(f"{dataset} {split}: no landmark has {min_images} images; lower data.options.min_images")
    return [n for n, _ in kept], [k for _, k in kept]


def _dataset(base: Path, names: list[str], keys: list[Any], transform: Transform, skip_bad_images: bool,
             hint: str) -> ImageDataset:
    labels, classes = encode_labels(keys)
    return ImageDataset(DirectoryStore(base), names, labels, [str(c) for c in classes], transform=transform,
                        skip_bad_images=skip_bad_images, missing_hint=hint)


def build_sfm120k(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False, min_images: int = 2
) -> ImageDataset:
    """retrieval-SfM-120k: ``retrieval-SfM-120k.pkl`` holds a ``train`` and a ``val`` part, each with ``cids``
    (image names), ``cluster`` (3D model of each image), ``qidxs``/``pidxs`` (matching pairs).

    Images are ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``. Labels are the clusters; clusters with fewer than
    ``min_images`` images are dropped (logged). Folder: ``root``, ``root/retrieval-SfM-120k`` or
    ``root/train/retrieval-SfM-120k`` (cirtorch's layout).
    """
    check_split("sfm120k", split, ("train", "val"))
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    base = _sfm120k_folder(root)
    part = _sfm120k_part(base / f"{SFM120K}.pkl", split, _SFM_KEYS)
    cids, clusters = [str(c) for c in part["cids"]], [int(c) for c in part["cluster"]]
    if len(cids) != len(clusters):
        raise ValueError(f"{base / f'{SFM120K}.pkl'} {split}: {len(cids)} cids but {len(clusters)} clusters")
    names, keys = _drop_small([sfm120k_image(c) for c in cids], clusters, min_images, "SfM-120k", split)
    return _dataset(base / "ims", names, keys, transform, skip_bad_images,
                    f"extract ims.tar.gz ({SFM120K_FILES[2]}) into {base / 'ims'}")


def sfm120k_pairs(root: str | Path, part: str) -> tuple[Path, list[str], np.ndarray]:
    """The matching pairs of SfM-120k ``part``: ``"val"`` or ``"train"`` of ``retrieval-SfM-120k.pkl``, or
    ``"whiten"``, cirtorch's ``retrieval-SfM-120k-whiten.pkl`` (its own ``cids``, ``qidxs``, ``pidxs``).

    Returns ``(images folder, image names, pairs (M, 2) int64 (query, positive) indices into the names)``;
    only the images some pair uses are listed.
    """
    check_split("sfm120k pairs", part, ("train", "val", "whiten"))
    base = _sfm120k_folder(root)
    if part == "whiten":
        path = base / f"{SFM120K}-whiten.pkl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; download {SFM120K_FILES[1]} into {base}")
        db = _sfm120k_part(path, "", ("cids", "qidxs", "pidxs"))
    else:
        db = _sfm120k_part(base / f"{SFM120K}.pkl", part, _SFM_KEYS)
    cids = [str(c) for c in db["cids"]]
    queries, positives = np.asarray(db["qidxs"], dtype=np.int64), np.asarray(db["pidxs"], dtype=np.int64)
    if queries.shape != positives.shape or queries.ndim != 1 or len(queries) == 0:
        raise ValueError(f"SfM-120k {part}: qidxs and pidxs must be equally long non-empty lists")
    if min(queries.min(), positives.min()) < 0 or max(queries.max(), positives.max()) >= len(cids):
        raise ValueError(f"SfM-120k {part}: pair indices must be in 0..{len(cids) - 1} (the cids)")
    used, pairs = np.unique(np.concatenate([queries, positives]), return_inverse=True)
    return base / "ims", [sfm120k_image(cids[i]) for i in used], pairs.reshape(2, -1).T.copy()


def gldv2_image(image_id: str) -> str:
    """Path of GLDv2 image ``image_id`` under ``train/``: ``<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def build_gldv2(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False, min_images: int = 2,
    val_landmarks: int = 0,
) -> ImageDataset:
    """Google Landmarks v2 clean: ``train_clean.csv`` (header ``landmark_id,images``; ``images`` space-separated
    image ids), images at ``train/<a>/<b>/<c>/<id>.jpg``.

    ``train`` is every landmark, or all but ``val_landmarks`` of them; ``val`` holds those ``val_landmarks``
    landmarks (a fixed choice: a permutation with seed 0 of the landmark ids in ascending order). Landmarks with
    fewer than ``min_images`` images are dropped first (logged). Folder: ``root`` or ``root/gldv2``.
    """
    check_split("gldv2", split, ("train", "val"))
    root = Path(root)
    base = next((b for b in (root, root / "gldv2") if (b / "train_clean.csv").is_file()), None)
    if base is None:
        raise FileNotFoundError(
            f"train_clean.csv not found in {root} or {root / 'gldv2'}; get train_clean.csv and the train/ image "
            f"archives from {GLDV2_URL} (GLDv2 clean) into {root / 'gldv2'}"
        )
    names, keys = _read_gldv2_csv(base / "train_clean.csv")
    names, keys = _drop_small(names, keys, min_images, "GLDv2-clean", split)
    if split == "val" and val_landmarks < 1:
        raise ValueError("gldv2 has no val split unless data.options.val_landmarks > 0 sets aside that many landmarks")
    landmarks = sorted(set(keys))
    if val_landmarks >= len(landmarks):
        raise ValueError(f"val_landmarks={val_landmarks} leaves no training landmark (there are {len(landmarks)})")
    held_out = {landmarks[i] for i in np.random.default_rng(0).permutation(len(landmarks))[:val_landmarks]}
    chosen = [(n, k) for n, k in zip(names, keys) if (k in held_out) == (split == "val")]
    return _dataset(base / "train", [n for n, _ in chosen], [k for _, k in chosen], transform, skip_bad_images,
                    f"extract the GLDv2 train archives ({GLDV2_URL}) into {base / 'train'}")


def _read_gldv2_csv(path: Path) -> tuple[list[str], list[int]]:
    names, keys = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["landmark_id", "images"]:
            raise ValueError(f"{path}: expected the header 'landmark_id,images', got {header}; use GLDv2's "
                             "train_clean.csv")
        for number, row in enumerate(reader, start=2):
            if len(row) != 2 or not row[0].strip().isdigit():
                raise ValueError(f"{path} line {number}: expected 'landmark_id,id1 id2 ...', got {row}")
            for image_id in row[1].split():
                names.append(gldv2_image(image_id))
                keys.append(int(row[0]))
    return names, keys
