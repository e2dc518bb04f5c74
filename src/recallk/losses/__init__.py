"""Losses: RS@k (the smooth Recall@k surrogate), Smooth-AP and FastAP on the same chunked kernel, RS@k's
cross-batch memory, SiMix, and their building blocks."""

from recallk.losses.average_precision import FastAPLoss, SmoothAPLoss
from recallk.losses.cross_batch_memory import CrossBatchRecallAtK
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup, same_class_pairs

__all__ = ["CrossBatchRecallAtK", "FastAPLoss", "RecallAtKLoss", "SmoothAPLoss", "SimilarityMixup", "same_class_pairs"]
