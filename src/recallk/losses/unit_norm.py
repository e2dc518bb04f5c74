"""A warning for embeddings that are not L2-normalised: RS@k then ranks by raw dot products, silently."""

from __future__ import annotations

import warnings

import torch

NORM_TOLERANCE = 1e-2  # bf16 rounding moves unit norms by about 2e-3; unnormalised outputs are off by far more


class UnnormalizedEmbeddingsWarning(UserWarning):
    """Embeddings given to a similarity-based loss are not unit vectors."""


def warn_if_not_unit_norm(embeddings: torch.Tensor, name: str = "embeddings", user: str = "the loss") -> None:
    """Warn (once per process with Python's default warning filter) when a row norm of ``embeddings`` (N, D) is
    more than ``NORM_TOLERANCE`` away from 1; ``user`` names who ranks them (the loss, retrieval_metrics).

    The losses and the retrieval metrics compare rows by dot product, which is the cosine similarity only for unit
    vectors; with other norms long vectors dominate every rank and retrieval quality drops without an error.
    """
    if embeddings.numel() == 0:
        return
    norms = torch.linalg.vector_norm(embeddings.detach().float(), dim=1)
    if bool(((norms - 1).abs() > NORM_TOLERANCE).any()):
        warnings.warn(
            f"the {name} given to {user} are not L2-normalised (row norms differ from 1), so {user} ranks them "
            "by raw dot product, not cosine similarity; normalise them first, e.g. "
            "torch.nn.functional.normalize(x, dim=1) (recallk's models already do)",
            UnnormalizedEmbeddingsWarning,
            stacklevel=2,
        )
