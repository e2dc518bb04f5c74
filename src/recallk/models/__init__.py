"""Backbones and the embedding head (pool -> LayerNorm -> Linear -> L2 normalisation)."""

from recallk.models.factory import (
    EmbeddingModel,
    create_model,
    create_model_from_config,
    list_backbones,
)
from recallk.models.heads import EmbeddingHead, GeM, GlobalAvgPool
from recallk.models.small_cnn import SmallCNN

__all__ = [
    "EmbeddingHead",
    "EmbeddingModel",
    "GeM",
    "GlobalAvgPool",
    "SmallCNN",
    "create_model",
    "create_model_from_config",
    "list_backbones",
]
