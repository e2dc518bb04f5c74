"""Using a trained model on new, unlabelled data: embedding image files or text lines, and gallery search.

These are the implementations of ``recallk embed --images/--texts`` and ``recallk search``; their Python forms are
:func:`recallk.load_model` and :class:`recallk.Index`, which this module only combines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.errors import RecallkUsageError
from recallk.evaluation.index import Index
from recallk.files import atomic_write, atomic_write_text
from recallk.pretrained import RecallkModel, load_model, open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CACHE_DIR = "search_cache"


def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``paths``: each a file, or a folder searched recursively (sorted, by suffix)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}); point at a folder of images"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; pass image files or folders of images")
    return files


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


def embed_items(
    model_path: str | Path, out: str | Path, images: Sequence[str | Path] = (), texts: str | Path | None = None,
    device: str = "cpu", batch_size: int = 256, progress: bool = True,
) -> Path:
    """Embed unlabelled image files (or folders of them), or the lines of a text file; save an ``.npz`` file with
    ``embeddings`` (N, D) float32 and ``item_ids`` (N,): the file paths, or the sentences."""
    model = load_model(model_path, device)
    if texts is not None:
        if not model.is_text:
            raise RecallkUsageError(f"--texts needs a text model, but {model_path} is an image model; use --images")
        items: list[Any] = read_text_lines(texts)
        ids = list(items)
    else:
        if model.is_text:
            raise RecallkUsageError(f"{model_path} is a text model; pass --texts FILE (one sentence per line)")
        items = list_image_files(images)
        ids = [str(p) for p in items]
    embeddings = model.embed(items, batch_size=batch_size, progress=progress)
    out = Path(out)
    atomic_write(out, lambda handle: np.savez(handle, embeddings=embeddings.numpy(), item_ids=np.array(ids)))
    return out


def model_fingerprint(model: RecallkModel) -> str:
    """SHA-256 of the network's weights and buffers and of its preprocessing: changes whenever the model does."""
    digest = hashlib.sha256(repr(model.preprocess).encode())
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
    cache_dir: str | Path | None = None, use_cache: bool = True,
) -> tuple[Index, Path | None, bool]:
    """The gallery's index, from the cache (in :func:`search_cache_folder`) when model and gallery are unchanged,
    else embedded and cached; returns ``(index, cache file, whether it came from the cache)``. With
    ``use_cache=False`` nothing is read or written and the cache file is None."""
    files = list_image_files(gallery)
    fingerprint = f"{model_fingerprint(model)}:{gallery_fingerprint(files)}"
    if not use_cache:
        return Index.build(model, files, [str(p) for p in files], batch_size, fingerprint, progress), None, False
    name = hashlib.sha256("\n".join(str(Path(g).resolve()) for g in gallery).encode()).hexdigest()[:16]
    cache = search_cache_folder(model_path, cache_dir) / f"gallery-{name}.npz"
    if cache.is_file():
        index = Index.load(cache)
        if index.fingerprint == fingerprint:
            return index, cache, True
    index = Index.build(model, files, [str(p) for p in files], batch_size, fingerprint, progress)
    return index, index.save(cache), False


def search_run(
    model_path: str | Path, gallery: Sequence[str | Path], queries: Sequence[str | Path], top_k: int = 5,
    out: str | Path | None = None, device: str = "cpu", batch_size: int = 256, progress: bool = True,
    cache_dir: str | Path | None = None, use_cache: bool = True,
) -> dict[str, Any]:
    """Search the gallery images for each query image; write ``out`` (JSON) and one picture per query next to it.

    ``cache_dir`` / ``use_cache``: where the gallery's embeddings are cached (:func:`cached_gallery_index`).
    Returns ``{"results": [{"query", "neighbours": [{"path", "similarity"}], "picture"}], "cache", "cached"}``
    (``cache`` None without a cache).
    """
    from recallk.evaluation.plots import plot_neighbours

    model_path = Path(model_path)
    model = load_model(model_path, device)
    if model.is_text:
        raise RecallkUsageError("recallk search works on images; for a text model embed sentences with --texts")
    index, cache, cached = cached_gallery_index(model, model_path, gallery, batch_size, progress, cache_dir, use_cache)
    query_files = list_image_files(queries)
    found = index.search(model.embed(query_files, batch_size=batch_size), k=top_k)
    out = Path(out) if out is not None else Path("search_results.json")
    results = []
    for number, (query, neighbours) in enumerate(zip(query_files, found), start=1):
        picture = out.with_name(f"{out.stem}_{number}_{query.stem}.png")
        plot_neighbours(
            picture, open_image(query), [(open_image(n.item_id), n.similarity) for n in neighbours], str(query)
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
