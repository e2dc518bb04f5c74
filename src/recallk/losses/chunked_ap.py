"""Smooth-AP's and FastAP's kernels for the query-chunked walk (:mod:`recallk.losses.chunked_walk`): per-query
average-precision surrogates and their closed-form gradients, without ever holding an N x M matrix.

Notation as in the walk: query i, database columns z, own column c_i (never a positive), excluded column
e_i = c_i (both losses leave the query out of its own database), P(i) = {x : y_x = y_i, x != c_i},
D(i) = every column but e_i, s the dot products. Both losses are
``terms = sum_{i : |P(i)| > 0} (1 - AP_i) / num_valid`` with the statistics ``AP_i`` (N x 1).

Smooth-AP (Brown et al., ECCV 2020), t = s / tau, for each (query, positive) pair (i, x):

    R(x, D) = 1 + sum_{z in D(i), z != x} sigmoid(t_iz - t_ix),   R(x, P) = 1 + sum_{z in P(i), z != x} (same)
    AP_i    = mean_{x in P(i)} R(x, P) / R(x, D)

Its gradient per pair, with a_i = -1 / (|P(i)| num_valid): dterms/dR(x, D) = -a_i R(x, P) / R(x, D)^2 and
dterms/dR(x, P) = a_i / R(x, D), so ``G_iz += (w_D + w_P [z in P(i)]) sigmoid'(t_iz - t_ix) / tau`` for z != x
and G_ix takes minus the sum of those. The pairs go in blocks of ``query_chunk`` pairs (B x M sigmoids, their
row sums give R(x, D); for R(x, P) they are gathered at the columns of the positive table, B x P values).

FastAP (Cakir et al., CVPR 2019) on d = 2 - 2 s (clamped to [0, 4]: the squared distance of unit vectors),
L = ``num_bins`` triangular bins of width Delta = 4 / L centred at c_l = l Delta (l = 0 ... L):

    delta_l(d) = max(0, 1 - |d - c_l| / Delta),   h+_il = sum_{z in P(i)} delta_l(d_iz),
    h-_il = sum_{z in D(i) \\ P(i)} delta_l(d_iz),  H+ = cumsum_l h+,  H = cumsum_l (h+ + h-)
    AP_i  = sum_{l : H_il > 0} h+_il H+_il / H_il / |P(i)|

Only per-query histograms ((L + 1) x 2 per row) are kept. With u_l = h+_l H+_l / H_l^2 and r_l = h+_l / H_l
(0 where H_l = 0), dAP/dh+_m = (H+_m / H_m + sum_{l >= m} (r_l - u_l)) / |P| and dAP/dh-_m = -sum_{l >= m} u_l
/ |P|; a column z with d_iz between c_l and c_{l+1} feeds bins l and l + 1, so
``G_iz = (2 / Delta) (g_l - g_{l+1})`` with g = dterms/dh of z's histogram (+ or -).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recallk.losses.chunked_walk import (
    ChunkGradient,
    QuerySide,
    chunk_pairs,
    pair_sigmoids,
    positive_index,
    positive_table,
    scatter_pair_terms,
)


class APKernel:
    """What the AP losses' kernels share: the query's own column left out of its database, one statistic per
    query (AP_i, N x 1) and the terms sum_{i valid} (1 - AP_i) / num_valid."""

    def query_side(self, labels: Tensor, ref_labels: Tensor, self_col: Tensor, dtype: torch.dtype) -> QuerySide:
        none = torch.empty(len(labels), 0, dtype=dtype, device=labels.device)
        positives = positive_index(labels, ref_labels, self_col)
        return QuerySide(labels, self_col, self_col, positives.num_pos, none, none, positives.class_start,
                         positives.own_slot, positives.index, none[0])

    def stats_width(self) -> int:
        return 1

    def terms(self, stats: Tensor, side: QuerySide, num_valid: int) -> Tensor:
        valid = side.num_pos > 0
        return (valid.sum() - (stats[:, 0] * valid).sum()) / num_valid


@dataclass(frozen=True)
class SmoothAPSettings(APKernel):
    """Smooth-AP's :class:`~recallk.losses.chunked_walk.ChunkKernel` (statistics: AP_i, N x 1)."""

    temperature: float
    query_chunk: int
    sync_free: bool = False

    @property
    def scale(self) -> float:
        return self.temperature

    def chunk(
        self, scaled: Tensor, side: QuerySide, ref_labels: Tensor, num_valid: int, need_grad: bool
    ) -> tuple[Tensor, ChunkGradient | None]:
        """AP_i of one chunk ``scaled`` = S_Q / tau (n x M) and, when ``need_grad``, G_Q = dterms/dS_Q.

        R(x, P) of a block's pairs reads the sigmoids at the columns of their query's row of the positive
        table (B x P), padded slots masked out; a padded pair (sync-free walk) has weight 0."""
        n, num_db = scaled.shape
        valid = side.num_pos > 0
        padded = self.sync_free
        pair_row, pair_col, pair_real = chunk_pairs(side, padded)
        table, table_real = positive_table(side)
        ap = scaled.new_zeros(n)
        grad = torch.zeros_like(scaled) if need_grad and (padded or bool(valid.any())) else None
        size = self.query_chunk
        buffer = scaled.new_empty(min(size, len(pair_row)), num_db)
        tiny = torch.finfo(scaled.dtype).tiny
        num_pos_all = side.num_pos.to(scaled.dtype).clamp(min=1.0)
        for start in range(0, len(pair_row), size):
            row, col = pair_row[start : start + size], pair_col[start : start + size]
            sig, excluded_sig, rank_all = pair_sigmoids(scaled, side, row, col, buffer[: len(row)])
            positives, positive_real = table[row], table_real[row]  # B x P
            rank_pos = 0.5 + (sig.gather(1, positives) * positive_real).sum(1)
            share = 1.0 / num_pos_all[row]  # 1 / |P(i)|, times 0 for a padded pair
            if pair_real is not None:
                share = share * pair_real[start : start + size]
            ap.index_add_(0, row, rank_pos / rank_all * share)
            if grad is None:
                continue
            a = -share / num_valid
            w_all = -a * rank_pos / rank_all**2 / self.temperature  # dterms/dR(x, D) / tau
            w_pos = a / rank_all / self.temperature  # dterms/dR(x, P) / tau
            if sig.device.type == "cpu":  # no subnormal operands (slow on CPUs): terms below 1e-19 |w| go
                sig = torch.nn.functional.threshold_(sig, tiny**0.5, 0.0)
            slope = sig.addcmul_(sig, sig, value=-1.0)  # sigmoid' = s (1 - s), in place
            pos_terms = slope.gather(1, positives) * (w_pos[:, None] * positive_real)
            terms = slope.mul_(w_all[:, None])
            terms.scatter_add_(1, positives, pos_terms)
            excluded_terms = excluded_sig * (1.0 - excluded_sig) * w_all  # e_i is never a positive
            # G_ix = -sum_{z in D(i), z != x} T_iz: the row sum less T_ie, and the T_ix added with the row undone
            scatter_pair_terms(grad, row, col, side.excluded[row].clamp(min=0), terms,
                               excluded_terms - terms.sum(1), -excluded_terms)
        return ap[:, None], None if grad is None else ChunkGradient(grad, None if padded else valid)


@dataclass(frozen=True)
class FastAPSettings(APKernel):
    """FastAP's :class:`~recallk.losses.chunked_walk.ChunkKernel` (statistics: AP_i, N x 1)."""

    num_bins: int
    query_chunk: int
    sync_free: bool = False
    scale: float = 1.0

    def chunk(
        self, scaled: Tensor, side: QuerySide, ref_labels: Tensor, num_valid: int, need_grad: bool
    ) -> tuple[Tensor, ChunkGradient | None]:
        """AP_i of one chunk ``scaled`` = S_Q (n x M) and, when ``need_grad``, G_Q = dterms/dS_Q."""
        n, num_db = scaled.shape
        num_bins, width = self.num_bins, 4.0 / self.num_bins
        rows = torch.arange(n, device=scaled.device)
        # in place where possible: about 5 n x M floats at the peak (S_Q, d, the long bin indices, G_Q)
        position = scaled.mul(-2.0).add_(2.0).clamp_(0.0, 4.0).div_(width)  # d / Delta in [0, L]
        lower = position.floor().clamp_(max=num_bins - 1)  # bin l of c_l <= d < c_{l+1}; d = 4 in the last
        frac = position.sub_(lower)  # delta_{l+1}(d); delta_l(d) = 1 - frac
        positive = side.labels[:, None] == ref_labels[None, :]  # the excluded column is taken out below
        bin_index = lower.add_(positive, alpha=num_bins + 1).long()  # bins of h- first, then h+
        del lower, positive
        has_excluded = side.excluded >= 0
        excluded = side.excluded.clamp(min=0)
        ex_bin, ex_frac = bin_index[rows, excluded], frac[rows, excluded] * has_excluded
        hist = scaled.new_zeros(n, 2 * (num_bins + 1))
        hist[:, 1:].scatter_add_(1, bin_index, frac)  # into bin l + 1
        hist.scatter_add_(1, bin_index, frac.neg_().add_(1.0))  # 1 - frac into bin l
        del frac
        hist[rows, ex_bin + 1] -= ex_frac
        hist[rows, ex_bin] -= (1.0 - ex_frac) * has_excluded
        neg, pos = hist[:, : num_bins + 1], hist[:, num_bins + 1 :]
        total_pos, total = pos.cumsum(1), (pos + neg).cumsum(1)
        filled = total > 0
        safe = torch.where(filled, total, torch.ones_like(total))
        ratio = torch.where(filled, pos / safe, 0.0)  # r_l
        weighted = ratio * total_pos / safe  # u_l
        num_pos = side.num_pos.to(scaled.dtype).clamp(min=1.0)
        ap = (ratio * total_pos).sum(1) / num_pos
        valid = side.num_pos > 0
        if not need_grad or not (self.sync_free or bool(valid.any())):
            return ap[:, None], None
        tail = lambda x: x.flip(1).cumsum(1).flip(1)  # noqa: E731  sum_{l >= m}
        d_pos = torch.where(filled, total_pos / safe, 0.0) + tail(ratio - weighted)
        d_neg = -tail(weighted)
        scale = torch.where(valid, -1.0 / (num_pos * num_valid), 0.0)[:, None]  # dterms/dAP_i
        g = torch.cat([d_neg, d_pos], 1) * scale  # dterms/dh (n x 2(L + 1))
        slope = (2.0 / width) * (g[:, :-1] - g[:, 1:])  # G for a column in bin l: (2 / Delta)(g_l - g_{l+1})
        grad = torch.gather(slope, 1, bin_index)  # the + table's row L (between h-_L and h+_0) is never used
        grad[rows, excluded] *= ~has_excluded
        return ap[:, None], ChunkGradient(grad, None if self.sync_free else valid)
