"""Descriptors of long image lists kept on disk chunk by chunk, so that an interrupted computation (a killed job, an
image that fails to decode halfway through R1M) resumes where it stopped instead of starting again.

A list of ``N`` images is cut into chunks of ``chunk_size`` consecutive images; chunk ``k`` is the file
``<folder>/<sha256 of (settings, its image paths and boxes)>.pt``, a float32 ``(n_k, D)`` tensor written atomically
(:func:`recallk.files.atomic_write`) as soon as it is computed. ``settings`` names everything else that changes a
descriptor (the weights, image size, scales, preprocessing, whitening), so a file is only ever read back for the same
computation. The caller removes the files (:meth:`DescriptorCache.discard`) once its result is saved.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from recallk.files import atomic_write

logger = logging.getLogger(__name__)

Compute = Callable[[list[int]], Iterator[Tensor]]  # image indices -> descriptors of chunk_size images at a time


def writable_folder(folder: str | Path) -> bool:
    """Whether ``folder`` exists or can be created, and files can be written into it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


class DescriptorCache:
    """Chunked, resumable descriptors in ``folder`` for one computation described by ``settings`` (any string)."""

    def __init__(self, folder: str | Path, settings: str, chunk_size: int = 1024) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.folder = Path(folder)
        self.settings = hashlib.sha256(settings.encode()).hexdigest()
        self.chunk_size = chunk_size
        self.files: list[Path] = []  # every chunk file this cache has read or written

    def _file(self, paths: Sequence[Path], boxes: Sequence | None) -> Path:
        digest = hashlib.sha256(self.settings.encode())
        for i, path in enumerate(paths):
            digest.update(f"{Path(path).resolve()}|{None if boxes is None else tuple(boxes[i])}\n".encode())
        return self.folder / f"{digest.hexdigest()[:40]}.pt"

    def descriptors(
        self, paths: Sequence[Path], compute: Compute, boxes: Sequence | None = None, what: str = "images"
    ) -> Iterator[Tensor]:
        """Yield the descriptors of ``paths`` (with ``boxes``, one per path, when given) chunk by chunk, in order:
        a chunk on disk is read, the others come from ``compute(indices)``, which must yield the descriptors of
        the images ``indices`` (the missing chunks' images, in order) ``chunk_size`` at a time."""
        size = self.chunk_size
        starts = range(0, len(paths), size)
        files = [self._file(paths[s:s + size], None if boxes is None else boxes[s:s + size]) for s in starts]
        self.files.extend(files)
        missing = [k for k, file in enumerate(files) if not file.is_file()]
        indices = [i for k in missing for i in range(starts[k], min(starts[k] + size, len(paths)))]
        if len(missing) < len(files):
            logger.info("resuming: the descriptors of %d of %d %s are read from %s", len(paths) - len(indices),
                        len(paths), what, self.folder)
        computed = compute(indices) if indices else iter(())
        wanted = set(missing)
        for k, file in enumerate(files):
            if k in wanted:
                chunk = next(computed)
                atomic_write(file, lambda handle, chunk=chunk: torch.save(chunk.float().cpu(), handle))
            else:
                chunk = torch.load(file, weights_only=True)
            yield chunk

    def discard(self) -> None:
        """Remove the chunk files of this cache (and its folder when nothing else is left in it)."""
        for file in self.files:
            file.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # absent, or holding another computation's chunks
