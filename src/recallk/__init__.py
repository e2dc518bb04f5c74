"""recallk: deep metric learning by directly optimising recall@k.

Implements "Recall@k Surrogate Loss with Large Batches and Similarity Mixup" (Patel, Tolias, Matas, CVPR 2022).
"""

from recallk.evaluation.metrics import retrieval_metrics
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup

__version__ = "0.1.0"

__all__ = ["RecallAtKLoss", "SimilarityMixup", "retrieval_metrics", "__version__"]
