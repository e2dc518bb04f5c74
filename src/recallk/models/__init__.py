"""Backbones, the embedding head (pool -> LayerNorm -> Linear -> L2 normalisation) and the optional whitening."""

from recallk.models.factory import (
    EmbeddingModel,
    create_model,
    create_model_from_config,
    list_backbones,
)
from recallk.models.heads import EmbeddingHead, GeM, GlobalAvgPool
from recallk.models.small_cnn import SmallCNN
from recallk.models.whitening import Whitening, learn_whitening, pca_whitening

__all__ = [
    "EmbeddingHead",
    "EmbeddingModel",
    "GeM",
    "GlobalAvgPool",
    "SmallCNN",
    "Whitening",
    "create_model",
    "create_model_from_config",
    "learn_whitening",
    "list_backbones",
    "pca_whitening",
]
