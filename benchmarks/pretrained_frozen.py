"""Frozen ImageNet features on Omniglot's test split at several image sizes (issue 21): what fine-tuning starts from.

The backbone of the recipe ``omniglot_efficientnet_lite0`` (packaged ImageNet weights, one input channel) in eval
mode embeds the 659 test classes' images exactly as the recipe feeds them (``data.image_size`` overridden); its
feature maps are average-pooled (the recipe's ``model.pooling``) and L2-normalised, and exact kNN gives recall@k
and MAP@R over the whole split. Raw pixels (flattened, L2-normalised) are the floor. The recipe's image size was
chosen from this table.

    python benchmarks/pretrained_frozen.py --sizes 32 40 56 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import omniglot_quality as oq

REPO = oq.REPO
RECIPE = REPO / "src" / "recallk" / "configs" / "omniglot_efficientnet_lite0.yaml"
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


@torch.no_grad()
def frozen_rows(size: int, max_classes: int | None, data_dir: str | None) -> list[tuple[str, dict[str, float]]]:
    """``[(label, metrics)]`` of the frozen backbone and of raw pixels on the test split at ``size`` px."""
    from recallk.config import load_config
    from recallk.evaluation.metrics import retrieval_metrics
    from recallk.training.assemble import build_network, build_split

    config = load_config(RECIPE, [f"data.image_size={size}"])
    network = build_network(config).eval()
    source = build_split(config, config.data.split_test[0], network, data_dir=data_dir)
    images = torch.cat(list(source.eval_batches(512)))
    labels = source.labels
    if max_classes is not None:
        keep = labels < max_classes
        images, labels = images[keep], labels[keep]
    features = torch.cat([F.adaptive_avg_pool2d(network.backbone(images[i : i + 512]), 1).flatten(1)
                          for i in range(0, len(images), 512)])
    rows = []
    for label, embeddings in ((f"EfficientNet-Lite0 ImageNet, frozen, average-pooled, {features.shape[1]}-d", features),
                              (f"raw pixels, {images[0].numel()}-d", images.flatten(1))):
        metrics = retrieval_metrics(F.normalize(embeddings, dim=1), labels, k=(1, 2, 4, 8))
        rows.append((label, {name: float(metrics[name]) for name in METRICS}))
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 40, 56], metavar="PX")
    parser.add_argument("--max-classes", type=int, help="only the first N test classes (smoke tests)")
    parser.add_argument("--data-dir", help="data root (default: $RECALLK_DATA or the user cache)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pretrained_frozen.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/pretrained_frozen.py", *(sys.argv[1:] if argv is None else argv)])
    m = oq.machine_info("cpu")
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} thread(s). "
        f"Command: `{command}`. Date: {datetime.date.today()}.",
        f"Test split: {'first ' + str(args.max_classes) + ' classes of ' if args.max_classes else ''}Omniglot's "
        "evaluation alphabets, each image a query against all others.",
        "",
        "| image size | embedding | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for size in args.sizes:
        for label, metrics in frozen_rows(size, args.max_classes, args.data_dir):
            lines.append(f"| {size} px | {label} | " + " | ".join(f"{metrics[m]:.3f}" for m in METRICS) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
