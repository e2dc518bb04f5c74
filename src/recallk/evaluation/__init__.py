"""Evaluation: exact kNN search and retrieval metrics (recall@k, precision@1, R-precision, MAP@R)."""

from recallk.evaluation.knn import exact_knn, iter_knn_chunks
from recallk.evaluation.metrics import retrieval_metrics

__all__ = ["exact_knn", "iter_knn_chunks", "retrieval_metrics"]
