"""Descriptor whitening stored with the model: a layer ``x -> normalize(P (x - m))`` and the two ways to fit it.

* :func:`learn_whitening` (Radenović et al., "Fine-tuning CNN image retrieval with no human annotation", TPAMI
  2018): from descriptors of matching pairs ``(q_i, p_i)``, ``m`` is the mean of the query descriptors, the
  intra-pair scatter ``S_w = mean_i (x_qi - x_pi)(x_qi - x_pi)^T = L L^T`` is whitened by ``L^-1``, and the
  whitened scatter of all descriptors ``S_b = L^-1 (X - m)(X - m)^T L^-T`` is rotated onto its eigenvectors ``V``
  in decreasing eigenvalue order: ``P = V^T L^-1``. Afterwards matching pairs differ by unit variance in every
  direction (``P S_w P^T = I``) and the directions that separate non-matching images come first.
* :func:`pca_whitening`: ``m`` the mean, ``C = V diag(lambda) V^T`` the covariance, ``P = diag(lambda)^-power V^T``.
  ``power = 0.5`` whitens fully (covariance ``I``); smaller powers (naver's deep-image-retrieval uses 0.25) only
  flatten the spectrum (covariance ``diag(lambda^(1 - 2 power))``).

Both keep the first ``dim`` rows of ``P`` (the leading directions) to reduce the dimension. Fits run in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Whitening(nn.Module):
    """``(B, D) -> (B, d)``: ``normalize((x - mean) @ projection^T)``, unit L2 norm rows.

    ``mean`` ``(D,)`` and ``projection`` ``(d, D)`` are buffers (saved in the state dict, not trained). A fresh layer
    holds zeros and the identity; load a fitted state dict or build it with :func:`learn_whitening` or
    :func:`pca_whitening`.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        if not 0 < out_dim <= in_dim:
            raise ValueError(f"whitening output dimension must be in 1..{in_dim} (the embedding size), got {out_dim}")
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("projection", torch.eye(out_dim, in_dim))
        self.in_dim, self.out_dim = in_dim, out_dim

    @classmethod
    def from_fit(cls, mean: Tensor, projection: Tensor) -> Whitening:
        layer = cls(projection.shape[1], projection.shape[0])
        layer.mean.copy_(mean.float())
        layer.projection.copy_(projection.float())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        centred = x.float() - self.mean
        return F.normalize(centred @ self.projection.t(), dim=-1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


def _check(descriptors: Tensor, dim: int | None) -> int:
    if descriptors.dim() != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {tuple(descriptors.shape)}")
    size = descriptors.shape[1]
    dim = size if dim is None else dim
    if not 0 < dim <= size:
        raise ValueError(f"whitening dimension must be in 1..{size} (the descriptor size), got {dim}")
    return dim


def _descending_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.t()) / 2)
    return values.flip(0), vectors.flip(1)


def learn_whitening(descriptors: Tensor, pairs: Tensor, dim: int | None = None) -> Whitening:
    """Learned whitening from matching pairs.

    ``descriptors`` ``(N, D)``; ``pairs`` ``(M, 2)`` int indices ``(query, positive)`` into its rows. Needs at
    least ``D`` pairs with linearly independent differences (else the intra-pair scatter is singular: a one-line
    ``ValueError`` saying so). Returns a :class:`Whitening` with ``dim`` (default ``D``) outputs.
    """
    dim = _check(descriptors, dim)
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError(f"pairs must be (M, 2) (query, positive) indices with M >= 1, got shape {tuple(pairs.shape)}")
    if int(pairs.min()) < 0 or int(pairs.max()) >= len(descriptors):
        raise ValueError(f"pair indices must be in 0..{len(descriptors) - 1} (rows of the descriptors)")
    x = descriptors.double()
    queries, positives = x[pairs[:, 0]], x[pairs[:, 1]]
    mean = queries.mean(dim=0)
    differences = queries - positives
    intra = differences.t() @ differences / len(differences)
    cholesky, info = torch.linalg.cholesky_ex(intra)
    if int(info) != 0:
        raise ValueError(
            f"the intra-pair scatter of {len(pairs)} pairs is singular in {x.shape[1]} dimensions; learned whitening "
            "needs more matching pairs than descriptor dimensions (or use PCA whitening)"
        )
    inverse = torch.linalg.solve_triangular(cholesky, torch.eye(len(cholesky), dtype=x.dtype), upper=False)
    whitened = (x - mean) @ inverse.t()
    _, rotation = _descending_eigh(whitened.t() @ whitened)
    projection = rotation.t() @ inverse
    return Whitening.from_fit(mean, projection[:dim])


NULL_VARIANCE = 1e-10  # eigenvalues below this fraction of the largest one are directions the descriptors lack


def pca_whitening(descriptors: Tensor, dim: int | None = None, power: float = 0.5, eps: float = 1e-9) -> Whitening:
    """PCA whitening of ``descriptors`` ``(N, D)``: ``P = diag(lambda + eps)^-power V^T`` over the ``dim`` leading
    principal directions (``power`` 0.5: full whitening, 0: rotation only).

    The descriptors must vary in ``dim`` directions (``N - 1 >= dim`` at least: ``N`` points span ``N - 1``):
    whitening a direction of (numerically) zero variance would scale noise by ``eps^-power``; a ``ValueError`` says
    how many directions there are instead."""
    dim = _check(descriptors, dim)
    if power < 0:
        raise ValueError(f"PCA whitening power must be >= 0 (0.5: full whitening), got {power}")
    if len(descriptors) < 2:
        raise ValueError("PCA whitening needs at least 2 descriptors")
    x = descriptors.double()
    mean = x.mean(dim=0)
    centred = x - mean
    values, vectors = _descending_eigh(centred.t() @ centred / (len(x) - 1))
    rank = int((values > NULL_VARIANCE * values[0].clamp(min=0)).sum()) if values[0] > 0 else 0
    if rank < dim:
        raise ValueError(
            f"PCA whitening to {dim} dimensions needs descriptors that vary in {dim} directions, but these {len(x)} "
            f"span only {rank}; fit on more images than dimensions (at least {dim + 1}) or reduce the dimension to "
            f"{max(rank, 1)}"
        )
    values, vectors = values[:dim] + eps, vectors[:, :dim]
    projection = values.pow(-power)[:, None] * vectors.t()
    return Whitening.from_fit(mean, projection)
