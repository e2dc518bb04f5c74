"""A searchable gallery: embeddings with their item ids, exact nearest-neighbour search, saved to one file.

``Index.build(model, files)`` embeds a gallery once (``model`` is anything with ``embed(items, batch_size)``,
e.g. :class:`recallk.pretrained.RecallkModel`); ``index.search(model.embed(queries), k=5)`` returns, for each
query, its ``k`` most similar gallery items by dot product (cosine similarity of unit-norm embeddings), ranked by
similarity descending then gallery position ascending. The search is exact: chunked torch matrix products
(memory ``O(chunk x N)``), or faiss ``IndexFlatIP`` when faiss is installed (same neighbours).
``index.save(path)`` / ``Index.load(path)`` keep it in an ``.npz`` file together with a ``fingerprint`` string
that callers use to tell whether the gallery or the model changed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from recallk.evaluation.knn import exact_knn
from recallk.files import atomic_write


class Neighbour(NamedTuple):
    """One search result: the gallery item's id, its position in the gallery and its similarity to the query."""

    item_id: str
    index: int
    similarity: float


def default_backend() -> str:
    """``"faiss"`` when faiss is installed, else ``"torch"`` (both exact)."""
    return "faiss" if importlib.util.find_spec("faiss") is not None else "torch"


class Index:
    """Gallery embeddings ``(N, D)`` (float32) and their ``N`` item ids."""

    def __init__(self, embeddings: Tensor, item_ids: Sequence[str], fingerprint: str = "") -> None:
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.dim() != 2 or len(embeddings) != len(item_ids):
            raise ValueError(
                f"need embeddings (N, D) and N item ids, got shape {tuple(embeddings.shape)} and {len(item_ids)} ids"
            )
        if len(item_ids) == 0:
            raise ValueError("the gallery is empty; give at least one item to index")
        self.embeddings = embeddings
        self.item_ids = [str(i) for i in item_ids]
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def build(
        cls, model: Any, items: Sequence[Any], item_ids: Sequence[str] | None = None, batch_size: int = 256,
        fingerprint: str = "", progress: bool = False,
    ) -> Index:
        """Embed ``items`` (image paths, PIL images, or strings for text models) with ``model.embed``.

        ``item_ids`` default to ``str(item)``.
        """
        ids = list(item_ids) if item_ids is not None else [str(item) for item in items]
        return cls(model.embed(list(items), batch_size=batch_size, progress=progress), ids, fingerprint)

    def search(self, queries: Tensor | np.ndarray, k: int = 5, backend: str | None = None) -> list[list[Neighbour]]:
        """The ``min(k, N)`` nearest gallery items of each query embedding (``queries``: ``(Q, D)`` or ``(D,)``, a
        tensor or numpy array: embeddings, not images; ``model.embed(images)`` gives them)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not isinstance(queries, (Tensor, np.ndarray)):
            raise ValueError(
                f"Index.search takes query embeddings (Q, D) (a tensor or numpy array), got a "
                f"{type(queries).__name__}; embed the queries with the model that built the index first: "
                "index.search(model.embed(['q.png']))"
            )
        queries = torch.as_tensor(queries, dtype=torch.float32).cpu()
        queries = queries.unsqueeze(0) if queries.dim() == 1 else queries
        if queries.dim() != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"query embeddings of shape {tuple(queries.shape)} do not match the gallery's dimension "
                f"{self.embeddings.shape[1]}; embed the queries with the model that built the index"
            )
        backend = backend or default_backend()
        if backend == "faiss":
            logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs each CPU feature it tries
        values, indices = exact_knn(queries, self.embeddings, k, backend=backend)
        return [
            [Neighbour(self.item_ids[j], j, float(v)) for v, j in zip(row_values.tolist(), row_indices.tolist())]
            for row_values, row_indices in zip(values, indices)
        ]

    def save(self, path: str | Path) -> Path:
        """Write embeddings, item ids and fingerprint to ``path`` (``.npz``, atomically)."""
        path = Path(path)
        atomic_write(
            path,
            lambda handle: np.savez(
                handle, embeddings=self.embeddings.numpy(), item_ids=np.array(self.item_ids),
                fingerprint=np.array(self.fingerprint),
            ),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Index:
        """An index written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"index file {path} does not exist; build one with Index.build(...).save(path)")
        with np.load(path, allow_pickle=False) as data:
            if not {"embeddings", "item_ids", "fingerprint"} <= set(data.files):
                raise ValueError(f"{path} is not a recallk index (needs embeddings, item_ids and fingerprint)")
            return cls(torch.from_numpy(data["embeddings"]), data["item_ids"].tolist(), str(data["fingerprint"]))
