"""The RS@k gradient plateau, isolated (issue 30): along a from-scratch training at batch 4,096, the share of
(query, positive) pairs whose loss gradient is not negligible and the mean rank of the positives, for RS@k under
each recall temperature and for Smooth-AP.

The runs are seed 0 of ``omniglot_quality.py --experiment large_batch`` at 4,096 (the small GroupNorm CNN from
scratch, 12 epochs, 48 steps, chunks of 256), each with ``output.census_every=2``: every second step the trainer
writes the census of its training batch (:func:`recallk.losses.census.positive_pair_census`; a pair has a gradient
when the gradient of its query's loss w.r.t. its similarity is at least 1e-3). Records with a census are taken
from ``<out>/omniglot_large_batch.jsonl`` (the temperature arms record it as they run) or from
``<out>/rank_plateau/omniglot_large_batch.jsonl``, where this script trains the runs still missing (the earlier
RS@k and Smooth-AP rows were made before the census existed). Writes ``<out>/rank_plateau.md`` and ``.png``.

    python benchmarks/rank_plateau.py --threads 1          # trains what is missing (about 5-10 min a run), reports
    python benchmarks/rank_plateau.py --report             # only the table and the plot
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import omniglot_quality as oq

VARIANTS = ("rsk_bs4096", "rsk_tauk_bs4096", "rsk_anneal_bs4096", "smooth_ap_bs4096")
TABLE_STEPS = (0, 2, 4, 8, 12, 16, 24, 32, 46)


def plan(out: Path, runs_dir: Path) -> list[oq.PlannedRun]:
    args = oq.parse_args(["--experiment", "large_batch", "--seeds", "0", "--only", *VARIANTS, "--out", str(out),
                          "--runs-dir", str(runs_dir)])
    return oq.plan_runs(oq.EXPERIMENTS["large_batch"], args)


def census_records(out: Path, runs: Sequence[oq.PlannedRun]) -> dict[str, dict]:
    """The record with a census of each planned run, by variant name (runs without one are absent)."""
    files = (oq.results_path(out, "large_batch", "jsonl"),
             oq.results_path(out / "rank_plateau", "large_batch", "jsonl"))
    by_key = {oq.record_key(r): r for path in files for r in oq.read_records(path) if r.get("census")}
    return {run.variant.name: by_key[run.key] for run in runs if run.key in by_key}


def label(run: oq.PlannedRun) -> str:
    name = run.variant.label.removesuffix(", batch 4096")
    return "RS@k tau_k = 1" if name == "RS@k" else name


def write_report(out: Path, runs: Sequence[oq.PlannedRun], records: dict[str, dict], command: str) -> None:
    lines = [
        "# The RS@k gradient plateau at batch 4,096, from scratch", "",
        f"- Command: `{command}`; date {datetime.date.today()}; runs of "
        + ", ".join(sorted({records[r.variant.name]["date"][:10] for r in runs if r.variant.name in records})),
        "- Setting: seed 0 of the large_batch experiment at 4,096 (GroupNorm CNN from scratch, 8 per class, 12 epochs,"
        " 48 steps); the census of each training batch before its step.",
        "- pairs with gradient: share of (query, positive) pairs whose query-loss gradient w.r.t. their similarity "
        "is >= 1e-3; mean rank: of the positives among the 4,095 other items.", "",
        "| loss | " + " | ".join(f"step {s}" for s in TABLE_STEPS) + " | test R@1 |",
        "|---|" + "---|" * (len(TABLE_STEPS) + 1),
    ]
    for run in runs:
        record = records.get(run.variant.name)
        if record is None:
            continue
        by_step = {row["step"]: row for row in record["census"]}
        cells = [f"{100 * by_step[s]['pairs_with_gradient']:.1f} % / {by_step[s]['mean_rank']:.0f}"
                 if s in by_step else "–" for s in TABLE_STEPS]
        recall = f"{100 * record['metrics']['recall@1']:.1f}" if record["status"] == "ok" else record["status"]
        lines.append(f"| {label(run)} | " + " | ".join(cells) + f" | {recall} |")
    lines.append("\nEach cell: pairs with gradient / mean rank of the positives.")
    (out / "rank_plateau.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(out: Path, runs: Sequence[oq.PlannedRun], records: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        record = records.get(run.variant.name)
        if record is None:
            continue
        steps = [row["step"] for row in record["census"]]
        axes[0].plot(steps, [100 * row["pairs_with_gradient"] for row in record["census"]], marker=".",
                     label=label(run))
        axes[1].plot(steps, [row["mean_rank"] for row in record["census"]], marker=".", label=label(run))
    axes[0].set_ylabel("(query, positive) pairs with a gradient (%)")
    axes[1].set_ylabel("mean rank of the positives (of 4,095)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Omniglot from scratch, batch 4,096: where the gradient goes (seed 0)")
    fig.tight_layout()
    fig.savefig(out / "rank_plateau.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--report", action="store_true", help="only write the table and the plot")
    parser.add_argument("--out", type=Path, default=oq.REPO / "benchmarks" / "results")
    parser.add_argument("--runs-dir", type=Path, default=oq.REPO / "runs" / "plateau")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/rank_plateau.py", *(sys.argv[1:] if argv is None else argv)])
    runs = plan(args.out, args.runs_dir)
    records = census_records(args.out, runs)
    if not args.report:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for run in runs:
            if run.variant.name in records:
                continue
            oq.log(f"[rank_plateau] {run.variant.name} seed 0: start")
            record = oq.execute(run, argparse.Namespace(config=oq.DEFAULT_CONFIG, runs_dir=args.runs_dir), command)
            oq.append_record(oq.results_path(args.out / "rank_plateau", "large_batch", "jsonl"), record)
        records = census_records(args.out, runs)
    if not records:
        oq.log("[rank_plateau] no runs with a census yet; run without --report")
        return 1
    write_report(args.out, runs, records, command)
    plot(args.out, runs, records)
    oq.log(f"[rank_plateau] wrote {args.out / 'rank_plateau.md'} and {args.out / 'rank_plateau.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
