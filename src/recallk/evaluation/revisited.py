"""The Revisited Oxford / Paris protocol (Radenović et al., CVPR 2018): mAP and mP@k under Easy, Medium and Hard.

Each query's ground truth ``gnd[q]`` holds ``easy``, ``hard`` and ``junk`` database indices (0-based). A protocol
names the positives and the ignored items of a query:

========  =================  ===================
protocol  positives          ignored
========  =================  ===================
easy      ``easy``           ``junk + hard``
medium    ``easy + hard``    ``junk``
hard      ``hard``           ``junk + easy``
========  =================  ===================

The database is ranked by similarity descending (ties: smaller database index first). Each positive's 0-based
position ``r_j`` (j-th positive in ranking order) is lowered by the number of ignored items ranked before it; then

- AP = ``sum_j (p0_j + p1_j) / (2 |P|)`` with ``p0_j = j / r_j`` (1 when ``r_j = 0``) and ``p1_j = (j + 1) /
  (r_j + 1)``: the trapezoid rule of the reference evaluator, **not** sklearn's average precision (positives at
  positions 0 and 2 give 0.7917, sklearn 0.8333);
- mP@k = ``#{j : r_j + 1 <= k'} / k'`` with ``k' = min(k, r_last + 1)``, the last positive's 1-based position;
- a query with no positive under a protocol is left out of that protocol's means.

Only the positions of each query's ``easy + hard + junk`` items are needed, so the database is never ranked in
full: :class:`RelevantRankCounter` takes the scores one database chunk at a time and counts, for every such item,
the items scored above it. Memory is ``O(Q x chunk + Q x R)`` for ``R`` ground-truth items per query, whatever the
database size (a million distractors included).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
GND_KEYS = ("easy", "hard", "junk")


def relevant_table(gnd: Sequence[Mapping[str, Any]]) -> Tensor:
    """Each query's ``easy + hard + junk`` database indices, unique and ascending: ``(Q, R)`` long, padded with -1."""
    rows = [np.unique(np.concatenate([np.asarray(g[key], dtype=np.int64).ravel() for key in GND_KEYS])) for g in gnd]
    table = torch.full((len(rows), max([len(r) for r in rows], default=0)), -1, dtype=torch.long)
    for q, row in enumerate(rows):
        table[q, : len(row)] = torch.from_numpy(row)
    return table


class RelevantRankCounter:
    """Exact 0-based ranking positions of chosen database items, from scores given one database chunk at a time.

    The position of item ``j`` for query ``q`` is ``#{i : s_qi > s_qj} + #{i < j : s_qi = s_qj}``: the number of
    database items ranked before it by similarity descending, ties by index ascending.

    Args:
        relevant: ``(Q, R)`` long database indices to rank (-1: padding), e.g. :func:`relevant_table`.
        relevant_scores: ``(Q, R)`` their similarities. Inside :meth:`add` they replace the chunk's own values for
            those items, so an item is compared with itself and with the others on identical numbers.
    """

    def __init__(self, relevant: Tensor, relevant_scores: Tensor) -> None:
        valid = relevant >= 0
        padded = torch.where(valid, relevant_scores.double(), torch.inf)
        self.sorted_scores, order = padded.sort(dim=1, stable=True)  # ascending, padding last
        self.sorted_index = relevant.gather(1, order)
        self.relevant = relevant
        self.relevant_scores = relevant_scores.double()
        self.order = order
        num_queries, width = relevant.shape
        self.above = torch.zeros(num_queries, width + 1, dtype=torch.long)  # histogram of searchsorted slots
        self.ties = torch.zeros(num_queries, width, dtype=torch.long)

    def add(self, start: int, scores: Tensor) -> None:
        """Count database items ``start .. start + C - 1`` with their ``(Q, C)`` similarities to every query."""
        scores = scores.detach().to("cpu", torch.float64).clone()
        stop = start + scores.shape[1]
        inside = (self.relevant >= start) & (self.relevant < stop)
        rows, cols = inside.nonzero(as_tuple=True)
        scores[rows, self.relevant[rows, cols] - start] = self.relevant_scores[rows, cols]
        # slot k = #{relevant r < v}: v is strictly above the relevant items in sorted slots 0 .. k-1
        left = torch.searchsorted(self.sorted_scores, scores, side="left")
        self.above.scatter_add_(1, left, torch.ones_like(left))
        right = torch.searchsorted(self.sorted_scores, scores, side="right")
        tied_rows, tied_cols = (right > left).nonzero(as_tuple=True)
        if tied_rows.numel():
            first, last = left[tied_rows, tied_cols], right[tied_rows, tied_cols]
            for offset in range(int((last - first).max())):
                slot = first + offset
                hit = slot < last
                slot = slot.clamp(max=self.ties.shape[1] - 1)
                before = hit & (tied_cols + start < self.sorted_index[tied_rows, slot])
                self.ties.index_put_((tied_rows[before], slot[before]), torch.ones_like(slot[before]), accumulate=True)

    def ranks(self) -> Tensor:
        """``(Q, R)`` 0-based positions of the items of ``relevant`` (in its column order; -1 for padding)."""
        strictly_above = self.above.flip(1).cumsum(1).flip(1)[:, 1:]  # slot p: items with slot > p
        sorted_ranks = strictly_above + self.ties
        ranks = torch.empty_like(sorted_ranks)
        ranks.scatter_(1, self.order, sorted_ranks)
        return torch.where(self.relevant >= 0, ranks, -1)


def _average_precision(positions: np.ndarray) -> float:
    """Trapezoid AP of ascending 0-based (junk-shifted) positive positions."""
    j = np.arange(len(positions), dtype=np.float64)
    p0 = np.where(positions == 0, 1.0, j / np.maximum(positions, 1))
    p1 = (j + 1) / (positions + 1)
    return float(((p0 + p1) / 2).sum() / len(positions))


def metrics_from_ranks(
    relevant: Tensor, ranks: Tensor, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float | int]]:
    """The protocol's metrics from the ranking positions of every query's ground-truth items.

    Args:
        relevant: ``(Q, R)`` database indices (-1: padding), e.g. :func:`relevant_table`.
        ranks: ``(Q, R)`` their 0-based ranking positions (:meth:`RelevantRankCounter.ranks`).
        gnd: per query ``easy``, ``hard`` and ``junk`` index lists.
        kappas: the k of mP@k.

    Returns:
        ``{protocol: {"map": ..., "mp@k": ..., "num_queries": ...}}`` (fractions in [0, 1]; ``num_queries`` counts
        the queries with a positive under that protocol; metrics are NaN when there is none).
    """
    results: dict[str, dict[str, float | int]] = {}
    for protocol, (positive_keys, ignored_keys) in PROTOCOLS.items():
        aps, precisions = [], []
        for q, g in enumerate(gnd):
            position = dict(zip(relevant[q].tolist(), ranks[q].tolist()))
            positives = {int(i) for key in positive_keys for i in np.asarray(g[key]).ravel()}
            ignored = {int(i) for key in ignored_keys for i in np.asarray(g[key]).ravel()} - positives
            if not positives:
                continue
            pos = np.sort([position[i] for i in positives])
            junk = np.sort([position[i] for i in ignored])
            shifted = pos - np.searchsorted(junk, pos)  # minus the ignored items ranked before each positive
            aps.append(_average_precision(shifted))
            last = shifted[-1] + 1
            precisions.append([(shifted + 1 <= min(k, last)).sum() / min(k, last) for k in kappas])
        table = np.asarray(precisions, dtype=np.float64).reshape(len(precisions), len(kappas))
        results[protocol] = {
            "map": float(np.mean(aps)) if aps else float("nan"),
            **{f"mp@{k}": float(table[:, i].mean()) if aps else float("nan") for i, k in enumerate(kappas)},
            "num_queries": len(aps),
        }
    return results


def check_gnd(gnd: Sequence[Mapping[str, Any]], num_database: int) -> None:
    """``ValueError`` (one line) when a query lacks ``easy``/``hard``/``junk`` or an index is outside the database."""
    for q, g in enumerate(gnd):
        missing = [key for key in GND_KEYS if key not in g]
        if missing:
            raise ValueError(f"ground truth of query {q} has no {', '.join(missing)}; each query needs {GND_KEYS}")
        for key in GND_KEYS:
            values = np.asarray(g[key]).ravel()
            if values.size and (values.min() < 0 or values.max() >= num_database):
                raise ValueError(
                    f"ground truth of query {q}: '{key}' holds index {int(values.max())} or {int(values.min())} "
                    f"outside the database of {num_database} items"
                )


def revisited_metrics(
    scores: np.ndarray | Tensor,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    chunk_size: int = 65536,
) -> dict[str, dict[str, float | int]]:
    """mAP and mP@k of the Easy, Medium and Hard protocols (see the module docstring).

    Args:
        scores: ``(Q, N)`` similarities of each query to each database item (numpy or tensor).
        gnd: one mapping per query with ``easy``, ``hard`` and ``junk`` (0-based database indices).
        kappas: the k of mP@k.
        chunk_size: database columns compared at a time.

    Returns:
        ``{"easy": {"map", "mp@1", "mp@5", "mp@10", "num_queries"}, "medium": {...}, "hard": {...}}``, fractions.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or len(scores) != len(gnd):
        raise ValueError(f"scores must be (num_queries, num_database) with one row per gnd entry ({len(gnd)}), "
                         f"got shape {tuple(scores.shape)}")
    check_gnd(gnd, scores.shape[1])
    return ranked_metrics(scores.split(chunk_size, dim=1), gnd, lambda rel: scores.gather(1, rel), kappas)


def ranked_metrics(
    score_chunks: Iterable[Tensor],
    gnd: Sequence[Mapping[str, Any]],
    relevant_scores: Any,
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float | int]]:
    """:func:`revisited_metrics` from the database's scores given chunk after chunk (columns in database order).

    ``relevant_scores(index)`` maps a ``(Q, R)`` tensor of database indices (padding replaced by 0) to their
    ``(Q, R)`` similarities; it is called once, before the first chunk is counted.
    """
    relevant = relevant_table(gnd)
    counter = RelevantRankCounter(relevant, torch.as_tensor(relevant_scores(relevant.clamp(min=0))))
    start = 0
    for chunk in score_chunks:
        counter.add(start, chunk)
        start += chunk.shape[1]
    return metrics_from_ranks(relevant, counter.ranks(), gnd, kappas)


def search_metrics(
    queries: Tensor,
    database: Tensor,
    gnd: Sequence[Mapping[str, Any]],
    distractors: Iterable[Tensor] = (),
    kappas: Sequence[int] = (1, 5, 10),
    chunk_size: int = 65536,
) -> dict[str, dict[str, float | int]]:
    """:func:`revisited_metrics` of dot-product search, exact, without a query x database matrix.

    Args:
        queries: ``(Q, D)`` descriptors (unit norm: the dot product is the cosine similarity).
        database: ``(N, D)`` descriptors of the database that ``gnd`` indexes.
        gnd: per query ``easy``, ``hard`` and ``junk`` indices into ``database``.
        distractors: ``(C, D)`` chunks of extra database descriptors (e.g. R1M, produced while they are
            embedded), ranked after ``database``; each chunk is scored, counted and dropped.
        kappas: the k of mP@k.
        chunk_size: database rows scored at a time.
    """
    check_gnd(gnd, len(database))
    queries = queries.float()

    def score_chunks() -> Iterator[Tensor]:
        for rows in itertools.chain(database.split(chunk_size), distractors):  # lazily: one chunk held at a time
            yield queries @ rows.to(queries.device, queries.dtype).T

    def relevant_scores(index: Tensor) -> Tensor:
        rows = database.to(queries.device, queries.dtype)[index.to(queries.device)]  # (Q, R, D)
        return torch.einsum("qd,qrd->qr", queries, rows)

    return ranked_metrics(score_chunks(), gnd, relevant_scores, kappas)


def format_revisited_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """``{benchmark: {protocol: metrics}}`` as a text table in percentages, one row per benchmark and protocol."""
    metrics = [m for m in next(iter(results.values()))["medium"] if m != "num_queries"] if results else []
    rows = [["benchmark", "protocol", *(m.replace("map", "mAP").replace("mp@", "mP@") for m in metrics), "queries"]]
    for name, result in results.items():
        for protocol in PROTOCOLS:
            values = result[protocol]
            rows.append([name, protocol, *(f"{100 * values[m]:.2f}" for m in metrics), str(values["num_queries"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(text.ljust(w) if i < 2 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths)))
        for row in rows
    )
