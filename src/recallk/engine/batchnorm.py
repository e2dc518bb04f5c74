"""Freezing BatchNorm layers, the paper's default for large-batch training.

With multistage (chunked) embedding, a BatchNorm layer in training mode would normalise each chunk with that
chunk's own statistics (so the result depends on the chunk size) and would update its running statistics once
per forward pass (twice per chunk: once when embedding without gradients, once when re-embedding). The paper
therefore keeps every BatchNorm layer in evaluation mode: it normalises with its running statistics, which never
change, while its affine weight and bias are still trained.

`freeze_batchnorm(model)` makes that permanent for the life of the module object: it puts every BatchNorm layer
(`nn.BatchNorm1d/2d/3d`, `nn.SyncBatchNorm`, the lazy variants and subclasses such as timm's `BatchNormAct2d`)
in eval mode and replaces that layer's `train` method so that a later `model.train()` leaves it in eval mode.
The override lives on the module object: it survives `copy.deepcopy` and pickling the whole model, but not a
`state_dict` round trip, so re-apply `freeze_batchnorm` after building a model and loading a state dict.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _TrainKeepingEval:
    """Stands in for a frozen BatchNorm layer's `train` method: `layer.train(mode)` always sets eval mode.

    A plain object holding the layer (rather than a bound method) so that the model can still be pickled.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.layer, False)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of `model` in eval mode for good and return `model`.

    After this call the layers use (and never update) their running mean and variance, also after
    `model.train()`; the affine parameters keep `requires_grad` as they were. Other layers are untouched.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.train = _TrainKeepingEval(module)
            module.eval()
    return model


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """True when `module` is a BatchNorm layer frozen by `freeze_batchnorm`."""
    return isinstance(module, _BatchNorm) and isinstance(module.__dict__.get("train"), _TrainKeepingEval)


def batchnorm_layers_in_training_mode(model: nn.Module) -> list[str]:
    """Names (as in `model.named_modules()`) of the BatchNorm layers that currently use batch statistics."""
    return [name for name, module in model.named_modules() if isinstance(module, _BatchNorm) and module.training]
