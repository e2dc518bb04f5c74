"""Where the gradient of a ranking loss goes: the positive-pair census of one batch.

For a batch E (N x D, L2-normalised) with labels y, S = E E^T and each item q a query against the rest of the batch:

    rank(q, x)  = 1 + #{z != q : S[q, z] > S[q, x]}              (the hard rank of positive x among q's database)
    g(q, x)     = num_valid * dL/dS[q, x]                          (the gradient of q's own loss w.r.t. S[q, x])

where L is the loss computed from S and num_valid the number of queries with a positive, so g is the gradient
of one query's loss (a number in [0, 1] for RS@k, Smooth-AP and FastAP) whatever the batch size. A pair has a
gradient when ``|g| >= threshold`` (default 1e-3: moving S[q, x] by 0.1 changes that query's loss by at least
1e-4). RS@k's recall term ``sigmoid((k - r) / tau_k)`` gives a positive ranked far beyond k no such gradient; the
census measures how many pairs are in that plateau.
"""

from __future__ import annotations

from typing import Any

import torch

from recallk.losses.recall_at_k import ChunkedRankingLoss

NEGLIGIBLE_GRADIENT = 1e-3


def positive_ranks(sim: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The hard rank ``1 + #{z != q : S[q, z] > S[q, x]}`` of every (query q, positive x) pair, row-major
    (P floats, P the number of same-label pairs q != x). ``sim``: N x N; memory O(chunk x N)."""
    n = len(sim)
    ranks = []
    for start in range(0, n, chunk):
        rows = sim[start:start + chunk].detach().clone()
        index = torch.arange(start, min(start + chunk, n), device=sim.device)
        rows[torch.arange(len(index)), index] = float("-inf")  # the query is not in its own database
        positive = labels[index, None] == labels[None, :]
        positive[torch.arange(len(index)), index] = False
        ascending = rows.sort(dim=1).values
        row, col = positive.nonzero(as_tuple=True)
        greater = n - torch.searchsorted(ascending[row], rows[row, col, None].contiguous(), right=True)[:, 0]
        ranks.append(1.0 + greater.to(torch.float64))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def positive_pair_census(
    loss_fn: Any, embeddings: torch.Tensor, labels: torch.Tensor, threshold: float = NEGLIGIBLE_GRADIENT
) -> dict[str, float]:
    """The census of one batch under ``loss_fn`` (a recallk chunked loss, e.g. RS@k or Smooth-AP; a
    :class:`~recallk.losses.CrossBatchRecallAtK` is censused through its RS@k, without the memory; SiMix is left
    out: the census is about the real pairs).

    ``embeddings``: N x D (normalised by the caller, as the loss sees them); ``labels``: N. Returns
    ``pairs_with_gradient`` (the share of (query, positive) pairs with ``|g| >= threshold``), ``mean_rank`` and
    ``median_rank`` of the positives, ``loss`` (without SiMix) and ``pairs`` (their number). Memory: N x N floats.
    """
    loss_fn = getattr(loss_fn, "loss", loss_fn)  # CrossBatchRecallAtK holds its RS@k as .loss
    if not isinstance(loss_fn, ChunkedRankingLoss):
        raise ValueError(
            f"the census needs a recallk chunked loss (rsk, smooth_ap, fast_ap), got {type(loss_fn).__name__}"
        )
    labels = labels.to(embeddings.device)
    sim = (embeddings.detach().float() @ embeddings.detach().float().T).requires_grad_(True)
    mixup, loss_fn.mixup = loss_fn.mixup, None
    try:
        with torch.enable_grad():
            loss = loss_fn.from_similarity(sim, labels)
            (grad,) = torch.autograd.grad(loss, sim)
    finally:
        loss_fn.mixup = mixup
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    num_valid = int(same.any(1).sum())
    pair_grad = grad[same].abs() * num_valid
    ranks = positive_ranks(sim, labels)
    pairs = len(ranks)
    return {
        "pairs_with_gradient": float((pair_grad >= threshold).double().mean()) if pairs else 0.0,
        "mean_rank": float(ranks.mean()) if pairs else float("nan"),
        "median_rank": float(ranks.median()) if pairs else float("nan"),
        "loss": float(loss),
        "pairs": pairs,
    }
