"""Does the Omniglot validation split select? Validation and test metrics of the demo recipe, epoch by epoch.

Trains ``configs/omniglot.yaml`` once (its validation split: ``data.val_classes`` held-out background classes) and
after every epoch also evaluates, with the same weights:

- ``test``: the 659 unseen evaluation classes (13,180 images), which the trainer only scores at the end;
- ``val30``: 30 classes drawn (seeded) from the validation classes, the size of the validation split before
  issue #11, to show how such a small database saturates.

Each epoch appends a JSON line to ``<out>/omniglot_validation.jsonl``; the report (``omniglot_validation.md``)
gives the per-epoch table and, per metric, the Spearman rank correlation between each validation split and the
test split over all epochs and over the second half (where picking the best epoch matters), and which epoch each
split would pick.

    python benchmarks/omniglot_validation.py --out benchmarks/results
    python benchmarks/omniglot_validation.py --report
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METRICS = ("recall@1", "map@r")
SUBSET_CLASSES = 30


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties) of two equally long lists."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    var = (sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def run(out: Path, data_dir: str | None, run_dir: Path, overrides: list[str]) -> None:
    import torch

    from recallk.config import load_config
    from recallk.data.sources import ArraySource, build_source
    from recallk.training.trainer import Trainer

    config = load_config(REPO / "configs" / "omniglot.yaml", [*overrides, "output.plots=false",
                                                               "output.export_embeddings=false"])
    log = out / "omniglot_validation.jsonl"

    class EveryEpochTest(Trainer):
        """The recipe's trainer, also scoring the test split and a 30-class validation subset after each epoch."""

        def _end_epoch(self) -> None:
            super()._end_epoch()
            assert self.val_source is not None
            scores: dict[str, Any] = {}
            for name, source in (("val", self.val_source), ("val30", subset), ("test", test)):
                metrics, _ = self.evaluate(source, name)
                scores[name] = {k: metrics[k] for k in METRICS}
                scores[name]["images"] = len(source.labels)
            row = {"epoch": self.epoch, **scores, "val_classes": config.data.val_classes,
                   "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                   "torch_threads": torch.get_num_threads()}
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    test = build_source(config.data, "test", False, data_dir, config.seed)
    trainer = EveryEpochTest(config, run_dir, data_dir=data_dir, progress=False)
    val = trainer.val_source
    generator = torch.Generator().manual_seed(config.seed)
    chosen = torch.randperm(int(val.labels.max()) + 1, generator=generator)[:SUBSET_CLASSES]
    keep = torch.isin(val.labels, chosen)
    subset = ArraySource(val.images[keep], val.labels[keep])
    started = time.perf_counter()
    try:
        trainer.fit()
    finally:
        trainer.close()
    print(f"done in {time.perf_counter() - started:.0f} s; wrote {log}")


def report(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "omniglot_validation.jsonl").read_text().splitlines() if line]
    val_name = f"val ({rows[0]['val_classes']} classes, {rows[0]['val']['images']} images)"
    sub_name = f"val30 ({SUBSET_CLASSES} classes, {rows[0]['val30']['images']} images)"
    test_name = f"test (659 classes, {rows[0]['test']['images']} images)"
    lines = [f"| epoch | {val_name} R@1 | MAP@R | {sub_name} R@1 | MAP@R | {test_name} R@1 | MAP@R |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[s][m]:.4f}" for s in ("val", "val30", "test") for m in METRICS]
        lines.append(f"| {r['epoch']} | " + " | ".join(cells) + " |")
    late = len(rows) // 2  # the second half of training, where choosing the best epoch matters
    lines += ["", f"| validation split | metric | Spearman with test, all epochs | Spearman, epochs {late + 1}-"
              f"{len(rows)} | epoch it picks | test at that epoch | best test |", "|---|---|---|---|---|---|---|"]
    for split in ("val", "val30"):
        for metric in METRICS:
            val_values = [r[split][metric] for r in rows]
            test_values = [r["test"][metric] for r in rows]
            pick = max(range(len(rows)), key=lambda i: (val_values[i], -i))  # first epoch with the best value
            lines.append(
                f"| {split} | {metric} | {_spearman(val_values, test_values):.3f} | "
                f"{_spearman(val_values[late:], test_values[late:]):.3f} | {rows[pick]['epoch']} | "
                f"{test_values[pick]:.4f} | {max(test_values):.4f} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "omniglot_validation.md").write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: <out>/omniglot_validation_run")
    parser.add_argument("--report", action="store_true", help="only write the report from the JSON lines")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=4")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run(args.out, args.data_dir, args.run_dir or args.out / "omniglot_validation_run", args.overrides)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
