"""Losses: RS@k (the smooth Recall@k surrogate), its cross-batch memory, SiMix, and their building blocks."""

from recallk.losses.cross_batch_memory import CrossBatchRecallAtK
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup, same_class_pairs

__all__ = ["CrossBatchRecallAtK", "RecallAtKLoss", "SimilarityMixup", "same_class_pairs"]
