"""SiMix: similarity mixup (Patel et al., CVPR 2022, Sec. 3.4).

For a same-class pair (a, b) and alpha ~ U(0, 1), the virtual embedding is ``e_m = alpha e_a + (1 - alpha) e_b``
(not re-normalised). :meth:`SimilarityMixup.mix_embeddings` materialises the V virtual embeddings (V x D, linear
in E, so gradients flow back to the originals); the loss appends them to its queries and its database, at
O(V x D) extra memory. :meth:`SimilarityMixup.mix` does the same on a similarity matrix: with the mixing matrix
``M`` ((N + V) x N; the identity on top, then one row per pair holding alpha at column a and 1 - alpha at column
b), the extended similarities are ``M S M^T``, because dot products are bilinear.

Draws come from ``generator`` when one is given, else from the generator set by :meth:`SimilarityMixup.seed`,
else from torch's default generator. Seeding per step (run seed + step) gives every rank of a distributed run
the same pairs and alphas.
"""

from __future__ import annotations

import torch


def same_class_pairs(labels: torch.Tensor) -> torch.Tensor:
    """Every unordered same-class pair ``(a, b)`` with ``a < b`` (V x 2, long).

    Pairs are grouped by class in increasing label order; within a class they follow batch order.
    """
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pieces = []
    for size in torch.unique(counts).tolist():
        if size < 2:
            continue
        group_starts = starts[counts == size]
        tri = torch.triu_indices(size, size, offset=1, device=labels.device)  # 2 x size*(size-1)/2
        positions = group_starts[:, None, None] + tri[None]  # G x 2 x P
        pieces.append((positions, group_starts))
    if not pieces:
        return torch.empty(0, 2, dtype=torch.long, device=labels.device)
    positions = torch.cat([p.permute(0, 2, 1).reshape(-1, 2) for p, _ in pieces])
    group_of = torch.cat([s.repeat_interleave(p.shape[2]) for p, s in pieces])
    positions = positions[torch.argsort(group_of, stable=True)]
    return order[positions]


class SimilarityMixup:
    """Adds virtual same-class items to a batch through its similarity matrix.

    Args:
        pairs_per_class: how many random same-class pairs to mix per class (fewer when a class has fewer pairs);
            ``None`` mixes every pair. The default, 6, is every pair at the paper's 4 samples per class (its
            setting) and the paper's count of mixtures beyond it: at 8 per class (28 pairs), mixing all pairs cost
            7-10 recall@1 points where 6 cost 1.6-2.5 (BENCHMARKS.md, issue 30).
    """

    def __init__(self, pairs_per_class: int | None = 6) -> None:
        if pairs_per_class is not None and (isinstance(pairs_per_class, bool) or pairs_per_class < 1):
            raise ValueError(f"pairs_per_class must be None (all pairs) or a positive int, got {pairs_per_class!r}")
        self.pairs_per_class = pairs_per_class
        self.generator: torch.Generator | None = None

    def seed(self, value: int) -> None:
        """Draw the next pairs and alphas from a CPU generator seeded with ``value`` (e.g. run seed + step)."""
        self.generator = torch.Generator().manual_seed(int(value))

    def __repr__(self) -> str:
        return f"SimilarityMixup(pairs_per_class={self.pairs_per_class})"

    def sample_pairs(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Same-class pairs to mix (V x 2): all of them, or ``pairs_per_class`` random ones per class."""
        pairs = same_class_pairs(labels)
        if self.pairs_per_class is None or len(pairs) == 0:
            return pairs
        shuffled = pairs[torch.randperm(len(pairs), generator=generator, device="cpu").to(pairs.device)]
        cls = labels[shuffled[:, 0]]
        order = torch.argsort(cls, stable=True)
        shuffled, cls = shuffled[order], cls[order]
        _, counts = torch.unique_consecutive(cls, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank_in_class = torch.arange(len(cls), device=cls.device) - starts
        return shuffled[rank_in_class < self.pairs_per_class]

    def draw(
        self,
        labels: torch.Tensor,
        pairs: torch.Tensor | None = None,
        alphas: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs (V x 2, long, on ``labels.device``) and alphas (V, float32 on the CPU) to mix, checked.

        ``pairs`` default to :meth:`sample_pairs`, ``alphas`` to U(0, 1) draws (pairs first, then alphas).
        """
        generator = generator if generator is not None else self.generator
        if pairs is None:
            pairs = self.sample_pairs(labels, generator)
        pairs = torch.as_tensor(pairs, dtype=torch.long, device=labels.device).reshape(-1, 2)
        if len(pairs) and bool((labels[pairs[:, 0]] != labels[pairs[:, 1]]).any()):
            raise ValueError("SiMix pairs must join items of the same class; some given pairs do not")
        if alphas is None:
            alphas = torch.rand(len(pairs), generator=generator, device="cpu")
        alphas = torch.as_tensor(alphas).reshape(-1)
        if len(alphas) != len(pairs):
            raise ValueError(f"got {len(alphas)} alphas for {len(pairs)} pairs; give one alpha per pair")
        return pairs, alphas

    def mix_embeddings(
        self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, alphas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The virtual items ``alpha e_a + (1 - alpha) e_b`` (V x D) of :meth:`draw`'s pairs, and their labels."""
        a, b = pairs[:, 0], pairs[:, 1]
        w = alphas.to(embeddings.device, embeddings.dtype)[:, None]
        return w * embeddings[a] + (1 - w) * embeddings[b], labels[a]

    def mix(
        self,
        sim: torch.Tensor,
        labels: torch.Tensor,
        pairs: torch.Tensor | None = None,
        alphas: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend a square similarity matrix with one virtual item per pair.

        Args:
            sim: N x N similarities, row i and column i are item i.
            labels: N integer labels.
            pairs: V x 2 same-class index pairs (a, b); default ``sample_pairs(labels)``.
            alphas: V weights on ``a``; default U(0, 1) draws from ``generator``.

        Returns:
            ``(sim_ext, labels_ext)``: (N + V) x (N + V) similarities ``M S M^T`` (original items first, then the
            virtual ones in pair order) and their N + V labels (a virtual item takes its pair's class).
        """
        if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"SiMix needs a square N x N similarity matrix, got shape {tuple(sim.shape)}")
        pairs, alphas = self.draw(labels.to(sim.device), pairs, alphas, generator)
        alphas = alphas.to(sim.device, sim.dtype)
        a, b, w = pairs[:, 0], pairs[:, 1], alphas
        rows = torch.cat([sim, w[:, None] * sim[a] + (1 - w[:, None]) * sim[b]])  # (N + V) x N
        cols = w[None, :] * rows[:, a] + (1 - w[None, :]) * rows[:, b]  # (N + V) x V
        return torch.cat([rows, cols], dim=1), torch.cat([labels, labels[a]])
