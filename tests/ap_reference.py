"""Brute-force references for Smooth-AP and FastAP, written as plain loops straight from the formulas (float64)."""

from __future__ import annotations

import torch


def _queries(num_q: int, num_db: int, labels: list[int], ref_labels: list[int] | None,
             self_index: list[int] | None):
    """Yield ``(q, database, positives)`` for each query with a positive: the query's own column (``self_index[q]``;
    None: column q when square without ``ref_labels``, else none) is left out of both."""
    ref = labels if ref_labels is None else ref_labels
    if self_index is None:
        self_index = list(range(num_q)) if num_q == num_db and ref_labels is None else [-1] * num_q
    for q in range(num_q):
        database = [z for z in range(num_db) if z != self_index[q]]
        positives = [z for z in database if ref[z] == labels[q]]
        if positives:
            yield q, database, positives


def smooth_ap_loop(
    sim: torch.Tensor, labels: list[int], ref_labels: list[int] | None = None,
    self_index: list[int] | None = None, temperature: float = 0.01,
) -> torch.Tensor:
    """Smooth-AP with one Python loop per query, positive and database item (differentiable through autograd).

    ``sim`` is queries x database; ``self_index[q]`` is query q's database column (None: column q when square
    without ``ref_labels``, else none); the query is left out of its own database and positives."""
    total, used = 0.0, 0
    for q, database, positives in _queries(*sim.shape, labels, ref_labels, self_index):
        ap = 0.0
        for i in positives:
            rank_all, rank_pos = 1.0, 1.0
            for j in database:
                if j != i:
                    term = torch.sigmoid((sim[q, j] - sim[q, i]) / temperature)
                    rank_all = rank_all + term
                    if j in positives:
                        rank_pos = rank_pos + term
            ap = ap + rank_pos / rank_all
        total, used = total + ap / len(positives), used + 1
    return 1.0 - total / used


def fast_ap_loop(
    sim: torch.Tensor, labels: list[int], ref_labels: list[int] | None = None,
    self_index: list[int] | None = None, num_bins: int = 10,
) -> torch.Tensor:
    """FastAP with one Python loop per query, bin and database item, on d = 2 - 2 s (differentiable)."""
    width = 4.0 / num_bins
    total, used = 0.0, 0
    for q, database, positives in _queries(*sim.shape, labels, ref_labels, self_index):
        ap, cum_pos, cum_all = 0.0, 0.0, 0.0
        for bin_ in range(num_bins + 1):
            h_pos, h_all = 0.0, 0.0
            for z in database:
                pulse = torch.relu(1.0 - torch.abs(2.0 - 2.0 * sim[q, z] - bin_ * width) / width)
                h_all = h_all + pulse
                if z in positives:
                    h_pos = h_pos + pulse
            cum_pos, cum_all = cum_pos + h_pos, cum_all + h_all
            if float(cum_all) > 0:
                ap = ap + h_pos * cum_pos / cum_all
        total, used = total + ap / len(positives), used + 1
    return 1.0 - total / used
