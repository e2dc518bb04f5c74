"""Using a trained model on new, unlabelled data: embedding image files or text lines, and gallery search.

These are the implementations of ``recallk embed --images/--texts`` and ``recallk search``; their Python forms are
:func:`recallk.load_model` and :class:`recallk.Index`, which this module only combines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from recallk.data.image_dataset import apply_pixel_limit
from recallk.data.listing import read_path_list
from recallk.errors import RecallkUsageError
from recallk.evaluation.index import Index
from recallk.files import atomic_write, atomic_write_text
from recallk.pretrained import RecallkModel, load_model, open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt",)  # a file of image paths, one a line
CACHE_DIR = "search_cache"
SHOWN_NAMES = 20  # file names listed in one warning about skipped or very large images

logger = logging.getLogger(__name__)


def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``paths``: each an image file; a list file (``.txt``: one image path a line, relative to
    its folder or absolute, :func:`~recallk.data.listing.read_path_list`); or a folder searched recursively (sorted)
    for files with an image suffix and files without a suffix that Pillow identifies (cirtorch's SfM-120k ``ims/``)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_file(p))
            if not found:
                raise FileNotFoundError(
                    f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}, or images without a suffix); "
                    "point at a folder of images"
                )
            files.extend(found)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            files.extend(read_path_list(path))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; pass image files, folders of images or a .txt list")
    return files


def _is_image_file(path: Path) -> bool:
    """An image suffix, or no suffix and contents Pillow identifies (it reads the header only)."""
    if path.suffix:
        return path.suffix.lower() in IMAGE_SUFFIXES
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image, too large for the current limit: reported when it is read
    except (OSError, ValueError):
        return False


def read_text_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one sentence per line), stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist; pass a file with one sentence per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"text file {path} has no non-empty lines; write one sentence per line")
    return lines


def _names(files: Sequence[Path]) -> str:
    shown = ", ".join(map(str, files[:SHOWN_NAMES]))
    return shown + (f" and {len(files) - SHOWN_NAMES} more" if len(files) > SHOWN_NAMES else "")


def embed_image_files(
    model: RecallkModel, files: Sequence[Path], batch_size: int = 256, progress: bool = True,
    skip_bad_images: bool = False, max_image_pixels: int | None = None, what: str = "images",
) -> tuple[torch.Tensor, list[Path]]:
    """Float32 unit-norm embeddings ``(N, D)`` of the image ``files`` that decode, and those files, described as
    :meth:`~recallk.pretrained.RecallkModel.embed` describes them (a landmark model: as its benchmarks do).

    An undecodable file is a one-line error naming it and ``--skip-bad-images``; with ``skip_bad_images`` such files
    are left out and reported in one warning (count and names) after the progress bar. ``max_image_pixels`` raises
    Pillow's decompression-bomb limit (:func:`~recallk.data.image_dataset.apply_pixel_limit`); files over the
    warning limit are read and reported in one warning instead of Pillow's raw one.
    """
    apply_pixel_limit(max_image_pixels)
    preprocess = model.preprocess
    assert preprocess is not None
    kept: list[Path] = []
    bad: list[Path] = []
    large: list[Path] = []

    def images() -> Iterator[torch.Tensor]:
        for path in files:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", Image.DecompressionBombWarning)
                    image = preprocess(path)
            except RecallkUsageError as err:
                if not skip_bad_images:
                    raise RecallkUsageError(
                        f"{err}; or pass --skip-bad-images to leave undecodable files out (reported in one warning)"
                    ) from None
                bad.append(path)
                continue
            if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
                large.append(path)
            kept.append(path)
            yield image
        if not kept:
            raise RecallkUsageError(f"none of the {len(files)} {what} could be decoded; pass readable image files")

    embeddings = model.describe(images(), batch_size, total=len(files), progress=progress)
    if large:
        logger.warning(
            "%d %s have more pixels than Pillow's decompression-bomb warning limit of %s and were read as usual "
            "(--max-image-pixels raises the limit): %s", len(large), what, f"{Image.MAX_IMAGE_PIXELS:,}", _names(large),
        )
    if bad:
        logger.warning("skipped %d of %d %s that could not be decoded (--skip-bad-images): %s",
                       len(bad), len(files), what, _names(bad))
    return embeddings, kept


def embed_items(
    model_path: str | Path, out: str | Path, images: Sequence[str | Path] = (), texts: str | Path | None = None,
    device: str = "cpu", batch_size: int = 256, progress: bool = True, skip_bad_images: bool = False,
    max_image_pixels: int | None = None,
) -> Path:
    """Embed unlabelled image files (or folders of them), or the lines of a text file; save an ``.npz`` file with
    ``embeddings`` (N, D) float32 and ``item_ids`` (N,): the file paths, or the sentences. ``skip_bad_images`` and
    ``max_image_pixels`` as in :func:`embed_image_files`."""
    model = load_model(model_path, device)
    if texts is not None:
        if not model.is_text:
            raise RecallkUsageError(f"--texts needs a text model, but {model_path} is an image model; use --images")
        ids = read_text_lines(texts)
        embeddings = model.embed(ids, batch_size=batch_size, progress=progress)
    else:
        if model.is_text:
            raise RecallkUsageError(f"{model_path} is a text model; pass --texts FILE (one sentence per line)")
        embeddings, files = embed_image_files(
            model, list_image_files(images), batch_size, progress, skip_bad_images, max_image_pixels
        )
        ids = [str(p) for p in files]
    out = Path(out)
    atomic_write(out, lambda handle: np.savez(handle, embeddings=embeddings.numpy(), item_ids=np.array(ids)))
    return out


def _open_reported(path: str | Path) -> Image.Image:
    """:func:`~recallk.pretrained.open_image` of a file already embedded: its size was reported then, so Pillow's
    decompression-bomb warning is not repeated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return open_image(path)


def model_fingerprint(model: RecallkModel) -> str:
    """SHA-256 of the network's weights and buffers and of how it describes images (preprocessing, scales): changes
    whenever the model does."""
    digest = hashlib.sha256(repr(model.description).encode())
    for name, tensor in sorted(model.network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gallery_fingerprint(files: Sequence[Path]) -> str:
    """SHA-256 of every gallery file's path, size and modification time: changes when a file is added, removed
    or rewritten."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def search_cache_folder(model_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`cached_gallery_index` keeps gallery caches: ``cache_dir``, else ``<model folder>/search_cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    model_path = Path(model_path)
    return (model_path if model_path.is_dir() else model_path.parent) / CACHE_DIR


def cached_gallery_index(
    model: RecallkModel, model_path: Path, gallery: Sequence[str | Path], batch_size: int = 256, progress: bool = True,
    cache_dir: str | Path | None = None, use_cache: bool = True, skip_bad_images: bool = False,
    max_image_pixels: int | None = None,
) -> tuple[Index, Path | None, bool]:
    """The gallery's index, from the cache (in :func:`search_cache_folder`) when model and gallery are unchanged,
    else embedded and cached; returns ``(index, cache file, whether it came from the cache)``. With
    ``use_cache=False`` nothing is read or written and the cache file is None. ``skip_bad_images`` and
    ``max_image_pixels`` as in :func:`embed_image_files`; files skipped when the cache was built are reported
    again (and refused without ``skip_bad_images``)."""
    files = list_image_files(gallery)
    fingerprint = f"{model_fingerprint(model)}:{gallery_fingerprint(files)}"
    name = hashlib.sha256("\n".join(str(Path(g).resolve()) for g in gallery).encode()).hexdigest()[:16]
    cache = search_cache_folder(model_path, cache_dir) / f"gallery-{name}.npz"
    if use_cache and cache.is_file():
        index = Index.load(cache)
        if index.fingerprint == fingerprint:
            indexed = set(index.item_ids)
            skipped = [p for p in files if str(p) not in indexed]
            if skipped and not skip_bad_images:
                raise RecallkUsageError(
                    f"{len(skipped)} gallery image(s) could not be decoded, e.g. {skipped[0]}; replace or delete them, "
                    "or pass --skip-bad-images to leave them out"
                )
            if skipped:
                logger.warning("skipped %d of %d gallery images that could not be decoded (--skip-bad-images): %s",
                               len(skipped), len(files), _names(skipped))
            return index, cache, True
    embeddings, kept = embed_image_files(
        model, files, batch_size, progress, skip_bad_images, max_image_pixels, what="gallery images"
    )
    index = Index(embeddings, [str(p) for p in kept], fingerprint)
    if not use_cache:
        return index, None, False
    return index, index.save(cache), False


def search_run(
    model_path: str | Path, gallery: Sequence[str | Path], queries: Sequence[str | Path], top_k: int = 5,
    out: str | Path | None = None, device: str = "cpu", batch_size: int = 256, progress: bool = True,
    cache_dir: str | Path | None = None, use_cache: bool = True,
    skip_bad_images: bool = False, max_image_pixels: int | None = None,
) -> dict[str, Any]:
    """Search the gallery images for each query image; write ``out`` (JSON) and one picture per query next to it.
    ``skip_bad_images`` and ``max_image_pixels`` (gallery and queries) as in :func:`embed_image_files`.

    ``cache_dir`` / ``use_cache``: where the gallery's embeddings are cached (:func:`cached_gallery_index`).
    Returns ``{"results": [{"query", "neighbours": [{"path", "similarity"}], "picture"}], "cache", "cached"}``
    (``cache`` None without a cache).
    """
    from recallk.evaluation.plots import plot_neighbours

    model_path = Path(model_path)
    model = load_model(model_path, device)
    if model.is_text:
        raise RecallkUsageError("recallk search works on images; for a text model embed sentences with --texts")
    index, cache, cached = cached_gallery_index(
        model, model_path, gallery, batch_size, progress, cache_dir, use_cache, skip_bad_images, max_image_pixels
    )
    query_embeddings, query_files = embed_image_files(
        model, list_image_files(queries), batch_size, False, skip_bad_images, max_image_pixels, what="queries"
    )
    found = index.search(query_embeddings, k=top_k)
    out = Path(out) if out is not None else Path("search_results.json")
    results = []
    for number, (query, neighbours) in enumerate(zip(query_files, found), start=1):
        picture = out.with_name(f"{out.stem}_{number}_{query.stem}.png")
        plot_neighbours(
            picture, _open_reported(query), [(_open_reported(n.item_id), n.similarity) for n in neighbours], str(query)
        )
        results.append({
            "query": str(query),
            "neighbours": [{"path": n.item_id, "similarity": n.similarity} for n in neighbours],
            "picture": str(picture),
        })
    report = {
        "model": str(model_path), "top_k": top_k, "results": results, "cache": str(cache) if cache else None,
        "cached": cached,
    }
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return report
