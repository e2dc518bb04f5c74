"""Text track batch sweep (issue 21): recall@1 of MiniLM fine-tuned with RS@k against the batch size, SiMix on/off.

all-MiniLM-L6-v2 is fine-tuned on the seen intents with recallk's ``CachedRecallAtKLoss`` (with and without
SiMix) at batches of 64 to 1,024 sentences and evaluated on the unseen intents' test sentences, with the protocol
and code of ``text_quality.py`` (same sampler, AdamW, mini-batches of 32, no model selection: the last step is
evaluated). Equal epochs: ``ceil(epochs * train sentences / batch)`` steps per run. Rules fixed before any run:

- learning rate: square-root scaling from text_quality's 5e-5 at 64 sentences, ``lr = 5e-5 * sqrt(batch / 64)``;
- intents per batch: 4 sentences per intent while the training intents suffice, else the smallest power of two
  that does (CLINC150's 75 seen intents: 512 = 64 x 8, 1,024 = 64 x 16).

Each finished run is appended to ``results/text_batch.jsonl`` and skipped when the script runs again;
``results/text_batch.{md,png}`` hold the table (mean ± sample std over seeds) and recall@1 against batch.

    HF_HUB_OFFLINE=1 python benchmarks/text_batch.py --threads 1 --seeds 0 1 2
    python benchmarks/text_batch.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import text_quality as tq
from recallk.data.text import load_text_split

BATCHES = (64, 128, 256, 512, 1024)
VARIANTS = ("rsk", "rsk_simix")


def sqrt_scaled_lr(batch: int) -> float:
    """The sweep's learning-rate rule: ``5e-5 * sqrt(batch / 64)``."""
    return tq.LR * math.sqrt(batch / tq.BATCH)


def samples_per_class(batch: int, intents: int) -> int:
    """4 sentences per intent, doubled until ``batch / m`` intents exist among the ``intents`` training intents."""
    m = 4
    while batch // m > intents:
        m *= 2
    return m


def run_budget(batch: int, train_size: int, intents: int, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that makes two runs of one batch size comparable (and equal, when it matches)."""
    return {"epochs": args.epochs, "batch": batch, "steps": math.ceil(args.epochs * train_size / batch),
            "lr": float(f"{sqrt_scaled_lr(batch):.6g}"), "mini_batch": args.mini_batch,
            "samples_per_class": samples_per_class(batch, intents)}


def planned(args: argparse.Namespace) -> list[tuple[str, str, int, dict[str, Any]]]:
    """``(dataset, variant, seed, budget)`` of every run the arguments ask for."""
    runs = []
    for dataset in args.datasets:
        train = load_text_split(dataset, "train", args.data_dir, val_classes=0)
        intents = len(set(train.labels.tolist()))
        for batch in args.batches:
            budget = run_budget(batch, len(train.texts), intents, args)
            runs += [(dataset, variant, seed, budget) for variant in args.variants for seed in args.seeds]
    return runs


def key(dataset: str, variant: str, seed: int, budget: dict[str, Any]) -> tuple:
    return dataset, variant, seed, tuple(sorted(budget.items()))


def run_all(path: Path, args: argparse.Namespace) -> None:
    done = {key(r["dataset"], r["variant"], r["seed"], r["budget"]) for r in tq.read_results(path)}
    runs = planned(args)
    for number, (dataset, variant, seed, budget) in enumerate(runs, 1):
        tag = f"[text batch {number}/{len(runs)}] {dataset} {variant} batch {budget['batch']} seed {seed}"
        if key(dataset, variant, seed, budget) in done:
            print(f"{tag}: skip (already in {path})", file=sys.stderr, flush=True)
            continue
        print(f"{tag}: {budget['steps']} steps ...", file=sys.stderr, flush=True)
        run_args = argparse.Namespace(data_dir=args.data_dir, steps=budget["steps"], batch=budget["batch"],
                                      lr=budget["lr"], mini_batch=budget["mini_batch"])
        result = tq.train_and_evaluate(dataset, variant, seed, run_args, budget["samples_per_class"])
        record = {"dataset": dataset, "variant": variant, "seed": seed, "budget": budget,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "machine": tq.machine(), **result}
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"{tag}: recall@1 {result['metrics']['recall@1']:.4f} ({result['train_seconds']:.0f} s)",
              file=sys.stderr, flush=True)


def report(path: Path, out: Path, args: argparse.Namespace, command: str) -> bool:
    """Table and plot of the planned runs found in ``path``; False when there are none."""
    wanted = {key(*run) for run in planned(args)}
    records = [r for r in tq.read_results(path) if key(r["dataset"], r["variant"], r["seed"], r["budget"]) in wanted]
    if not records:
        print(f"no planned runs in {path} yet", file=sys.stderr)
        return False
    machines = sorted({f"{r['machine']['cpu']}, {r['machine']['threads']} thread(s), torch {r['machine']['torch']}"
                       for r in records})
    dates = sorted(r["date"] for r in records)
    lines = [
        "<!-- written by benchmarks/text_batch.py; do not edit by hand -->",
        f"Machine: {'; '.join(machines)}. Runs {dates[0]} to {dates[-1]}. Command: `HF_HUB_OFFLINE=1 python "
        f"benchmarks/text_batch.py --datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))} "
        f"--batches {' '.join(map(str, args.batches))} --epochs {args.epochs:g} --mini-batch {args.mini_batch}` "
        f"(this report: `{command}`).",
        f"Budget: {args.epochs} epoch(s) of the seen intents' training sentences at every batch size, "
        f"lr = 5e-5 * sqrt(batch / 64), mini-batch {args.mini_batch}; recall@1 and MAP@R on the unseen intents' "
        "test sentences, mean ± sample std over seeds.",
        "",
    ]
    curves: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for dataset in args.datasets:
        rows = [r for r in records if r["dataset"] == dataset]
        if not rows:
            continue
        lines += [f"**{dataset}**", "", "| batch | intents x m | steps | lr | "
                  + " | ".join(f"{tq.LABELS[v].split(' (')[0]} R@1 | MAP@R | seeds" for v in args.variants) + " |",
                  "|---" * (4 + 3 * len(args.variants)) + "|"]
        for batch in args.batches:
            at = [r for r in rows if r["budget"]["batch"] == batch]
            if not at:
                continue
            b = at[0]["budget"]
            cells = []
            for variant in args.variants:
                runs = [r for r in at if r["variant"] == variant]
                r1 = np.array([r["metrics"]["recall@1"] for r in runs])
                mapr = np.array([r["metrics"]["map@r"] for r in runs])
                cells += [cell(r1), cell(mapr), str(len(runs))]
                if len(r1):
                    curves.setdefault(dataset, {}).setdefault(variant, []).append(
                        (batch, r1.mean(), r1.std(ddof=1) if len(r1) > 1 else 0.0))
            lines.append(f"| {batch} | {batch // b['samples_per_class']} x {b['samples_per_class']} | {b['steps']} "
                         f"| {b['lr']:.3g} | " + " | ".join(cells) + " |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(curves, out.with_suffix(".png"))
    print("\n".join(lines))
    return True


def cell(values: np.ndarray) -> str:
    if not len(values):
        return "–"
    return f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else "")


def plot(curves: dict[str, dict[str, list[tuple[int, float, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (dataset, by_variant) in zip(axes[0], curves.items()):
        for variant, points in by_variant.items():
            batches, means, stds = zip(*points)
            ax.errorbar(batches, means, yerr=stds, marker="o", capsize=3, label=tq.LABELS[variant].split(" (")[0])
        ax.set_xscale("log", base=2)
        ticks = sorted({batch for points in by_variant.values() for batch, _, _ in points})
        ax.set_xticks(ticks, [str(batch) for batch in ticks])
        ax.set(title=f"{dataset}: RS@k at equal epochs", xlabel="batch (sentences per step)",
               ylabel="recall@1, unseen intents")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["clinc150"], choices=tq.DATASETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), metavar="B")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs of the training sentences per run")
    parser.add_argument("--mini-batch", type=int, default=32, help="sentences per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $RECALLK_DATA or the user cache)")
    parser.add_argument("--out", type=Path, default=tq.RESULTS / "text_batch", help="results path without suffix")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from saved results")
    args = parser.parse_args(argv)
    bad = [b for b in args.batches if b < 8 or b % 4]
    if bad or args.epochs <= 0:
        parser.error(f"--batches must be multiples of 4 from 8 (got {bad}) and --epochs positive (got {args.epochs})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        tq.torch.set_num_threads(args.threads)
    command = "python benchmarks/text_batch.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".jsonl")
    if not args.report:
        run_all(path, args)
    return 0 if report(path, args.out, args, command) else 1


if __name__ == "__main__":
    raise SystemExit(main())
