"""Losses: RS@k (the smooth Recall@k surrogate), SiMix, and their building blocks."""

from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup, same_class_pairs

__all__ = ["RecallAtKLoss", "SimilarityMixup", "same_class_pairs"]
