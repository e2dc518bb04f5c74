"""Evaluation: exact kNN search, retrieval metrics (recall@k, precision@1, R-precision, MAP@R) and the Revisited
Oxford/Paris protocol (mAP, mP@k under Easy/Medium/Hard)."""

from recallk.evaluation.knn import exact_knn, iter_knn_chunks
from recallk.evaluation.metrics import retrieval_metrics
from recallk.evaluation.revisited import revisited_metrics

__all__ = ["exact_knn", "iter_knn_chunks", "retrieval_metrics", "revisited_metrics"]
