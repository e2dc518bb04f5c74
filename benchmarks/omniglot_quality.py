"""Retrieval quality on Omniglot, side by side: RS@k against AP surrogates and baseline losses, RS@k across batch
sizes, and RS@k against the AP surrogates at the same large batch.

Every run trains the recipe of ``configs/omniglot.yaml`` (small CNN, 28 px, AdamW 3e-3, cosine schedule with one
warm-up epoch) with the CNN at half width (``NARROW_CNN``: 16-32-64-128, a quarter of the FLOPs, so that the 42
runs fit a CPU session) and a few dotted overrides, picks its best epoch on 30 validation classes
(``VALIDATION_CLASSES``, the recipe's number when these results were made; MAP@R, as the
trainer does) and reports retrieval on the 659 unseen test classes. Nothing is tuned on the test split.

Experiments (``--experiment``):

- ``losses``: rsk, rsk_simix (SiMix), rsk_parity (the authors' rank that counts the query itself), recallk's
  smooth_ap and fast_ap (the registry's chunked losses) and the pytorch-metric-learning baselines with the
  defaults of :func:`recallk.losses.factory.build_loss`, all with the same recipe and the same budget
  (``--epochs``, default 3) at batch 512 = 128 classes x 4; plus the two proxy losses with their papers' proxy
  learning rate (``optim.loss_lr_mult=100``).
- ``batch``: RS@k at batch sizes 64, 256, 1024 and 4096 for ``--batch-epochs`` (default 4) epochs each, so every
  size sees the same images (and takes ``18680 // batch`` steps per epoch) at the same learning rate. One model
  for all sizes: the CNN with GroupNorm (``model.norm=group``), since BatchNorm must be frozen in the multistage
  engine, and a from-scratch network with BatchNorm frozen at its initial statistics trains badly. Every size uses
  ``train.chunk_size=256`` (1024 and 4096 go through the multistage engine; GroupNorm makes chunking exact) and 8
  samples per class: 4096 / 4 = 1024 classes would exceed the 934 training classes, and one value for all sizes
  keeps the batch size the only thing that changes.
- ``large_batch``: the chunked losses of the registry (RS@k, Smooth-AP, FastAP) at batches 1024 and 4096, in the
  setting of ``batch`` (GroupNorm, 8 samples per class, the multistage engine with chunks of 256, the recipe's
  lr for every loss and size) for ``--large-batch-epochs`` (default 12) epochs each: the comparison the paper makes,
  which only a chunked AP loss can run (pytorch-metric-learning's versions need N x N x N or N x N x bins memory).

Each finished run appends one JSON line to ``<out>/omniglot_<experiment>.jsonl`` (variant, seed, overrides, test
metrics, times, date, machine); runs already there with the same overrides are skipped, so an interrupted
benchmark resumes where it stopped. At the end (or with ``--report`` alone) ``<out>/omniglot_<experiment>.md``
(mean ± std over seeds) and ``<out>/omniglot_<experiment>.png`` are written from the runs that match the flags.

    python benchmarks/omniglot_quality.py --experiment losses --seeds 0 1 2
    python benchmarks/omniglot_quality.py --experiment batch --only bs64 bs4096 --seeds 0
    python benchmarks/omniglot_quality.py --experiment large_batch --threads 1 --only rsk_bs1024 smooth_ap_bs1024
    python benchmarks/omniglot_quality.py --report
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recallk.registry import CHUNKED_LOSSES, LOSSES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "omniglot.yaml"
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision")
TABLE_METRICS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
                 ("map@r", "MAP@R"))
# The head of every results table (this script's, pretrained_quality.py's, gpu_quality.py's).
TABLE_HEADER = ("| variant | " + " | ".join(label for _, label in TABLE_METRICS) + " | seeds | steps | train min |",
                "|---|" + "---|" * (len(TABLE_METRICS) + 3))
# Output settings of every run: the summary is all the benchmark reads.
RUN_SETTINGS = ("output.plots=false", "output.export_embeddings=false")


@dataclass(frozen=True)
class Variant:
    """One row of a results table: a name for ``--only``, a label for tables and plots, and its config overrides."""

    name: str
    label: str
    overrides: tuple[str, ...]
    batch_size: int | None = None  # x position in the batch-size plot
    series: str = ""  # the line of the batch-size plot this variant belongs to (one line per loss)


# The baselines in the order of recallk.losses.factory.BASELINES: the registry's losses that are not recallk's own
# (recallk.registry needs no torch, so --report and --help stay light).
BASELINE_LOSSES = tuple(name for name in LOSSES if name not in CHUNKED_LOSSES)
LOSS_VARIANTS = (
    Variant("rsk", "RS@k", ("loss.name=rsk",)),
    Variant("rsk_simix", "RS@k + SiMix", ("loss.name=rsk", "loss.simix=true")),
    Variant("rsk_parity", "RS@k, authors' rank", ("loss.name=rsk", "loss.rank_includes_query=true")),
    # recallk's other chunked losses (the stored runs of PML 2.9's SmoothAPLoss, which groups the batch wrongly,
    # are kept in the results file as variant pml_smooth_ap and no longer reported; see BENCHMARKS.md)
    *(Variant(name, f"{name} (recallk)", (f"loss.name={name}",)) for name in CHUNKED_LOSSES if name != "rsk"),
    *(Variant(name, name, (f"loss.name={name}",)) for name in BASELINE_LOSSES),
    # The proxy losses again with their papers' proxy learning rate (100x the network's), not a tuned value.
    *(Variant(f"{name}_proxy_lr100", f"{name}, proxies at 100x lr", (f"loss.name={name}", "optim.loss_lr_mult=100"))
      for name in ("normalized_softmax", "proxy_anchor")),
)
# The demo's CNN at half width (about a quarter of its FLOPs), so that 42 training runs fit a CPU session.
NARROW_CNN = ("model.widths=[16,32,64,128]",)
# The 30 validation classes these results were computed with (the recipe validates on 200 since issue #11; pinning
# 30 here keeps the stored runs in benchmarks/results valid and their best epochs comparable).
VALIDATION_CLASSES = ("data.val_classes=30",)
BATCH_SIZES = (64, 256, 1024, 4096)
BATCH_SHARED = ("model.norm=group", "train.chunk_size=256", "data.samples_per_class=8")
BATCH_VARIANTS = tuple(
    Variant(f"bs{size}", f"batch {size}", ("loss.name=rsk", *BATCH_SHARED, f"data.batch_size={size}"),
            batch_size=size, series="RS@k")
    for size in BATCH_SIZES
)
LOSS_LABELS = {"rsk": "RS@k", "smooth_ap": "Smooth-AP", "fast_ap": "FastAP"}
LARGE_BATCH_SIZES = (1024, 4096)
# The census of every few steps (an output setting: it leaves the config digest, so the stored runs stay valid).
CENSUS = ("output.census_every=2",)
# Issue 30's recall temperatures at 4,096, fixed before any run: tau_k = k (the authors' code until 2024-11), and
# tau_k annealed geometrically from the batch size (the rank range) to the paper's 1 over the first half of the
# epochs (6 of 12).
TAU_K_VARIANTS = (
    ("rsk_tauk", "RS@k tau_k = k", ("loss.tau_k=[1,2,4,8,16]",)),
    ("rsk_anneal", "RS@k tau_k 4096 -> 1", ("loss.tau_k_start=4096", "loss.tau_k_anneal_epochs=6")),
)
LARGE_BATCH_VARIANTS = tuple(
    Variant(f"{name}_bs{size}", f"{LOSS_LABELS.get(name, name)}, batch {size}",
            (f"loss.name={name}", *BATCH_SHARED, f"data.batch_size={size}", *(CENSUS if size == 4096 else ())),
            batch_size=size, series=LOSS_LABELS.get(name, name))
    for name in CHUNKED_LOSSES for size in LARGE_BATCH_SIZES
) + tuple(
    Variant(f"{name}_bs4096", f"{label}, batch 4096", ("loss.name=rsk", *BATCH_SHARED, "data.batch_size=4096",
                                                      *overrides, *CENSUS), batch_size=4096, series=label)
    for name, label, overrides in TAU_K_VARIANTS
)


@dataclass(frozen=True)
class Experiment:
    """A results table: its variants and a sentence on the setting they share."""

    name: str
    title: str
    variants: tuple[Variant, ...]
    notes: str  # the setting, for the report header
    epochs_option: str  # the command-line option that sets every run's epochs (an attribute of the arguments)


EXPERIMENTS = {
    "losses": Experiment(
        "losses", "Omniglot: RS@k against baseline losses", LOSS_VARIANTS,
        "Recipe configs/omniglot.yaml (CNN at half width 16-32-64-128 with BatchNorm, 28 px, batch 512 = 128 "
        "classes x 4, AdamW 3e-3, cosine with 1 warm-up epoch), the same for every loss; baselines with "
        "pytorch-metric-learning defaults as built by recallk.losses.factory.build_loss; the proxy losses also with "
        "proxies at 100x the learning rate (optim.loss_lr_mult=100), as their papers train them.",
        "epochs",
    ),
    "batch": Experiment(
        "batch", "Omniglot: RS@k across batch sizes", BATCH_VARIANTS,
        "Recipe configs/omniglot.yaml with the CNN at half width (16-32-64-128) and its BatchNorm replaced by "
        "GroupNorm (model.norm=group), "
        "8 samples per class, train.chunk_size=256 (batches 1024 and 4096 use the multistage engine), "
        "the same lr and epochs for every size (equal images seen, so fewer steps for larger batches).",
        "batch_epochs",
    ),
    "large_batch": Experiment(
        "large_batch", "Omniglot: RS@k against AP surrogates at the same large batch", LARGE_BATCH_VARIANTS,
        "The setting of the batch experiment (CNN at half width with GroupNorm, 8 samples per class, "
        "train.chunk_size=256 so both sizes go through the multistage engine, AdamW 3e-3 cosine with 1 warm-up "
        "epoch), the same for every loss; each loss with its registry defaults (RS@k k=1..16, tau 0.01/1; "
        "Smooth-AP tau 0.01; FastAP 10 bins).",
        "large_batch_epochs",
    ),
}


@dataclass(frozen=True)
class PlannedRun:
    """One training run; ``config_digest`` identifies its resolved config, so a result is reused only for the
    same recipe, overrides and seed (an edited configs/omniglot.yaml makes the runs new)."""

    experiment: str
    variant: Variant
    seed: int
    overrides: tuple[str, ...]  # everything passed to load_config besides RUN_SETTINGS
    config_digest: str

    @property
    def key(self) -> tuple[str, int, str]:
        return self.variant.name, self.seed, self.config_digest


# ---------------------------------------------------------------------------------------------------------------------
# Planning


def selected_experiments(choice: str, only: Sequence[str] | None = None) -> list[Experiment]:
    """The experiments of ``--experiment``, less those that ``--only`` leaves without variants."""
    chosen = list(EXPERIMENTS.values()) if choice == "all" else [EXPERIMENTS[choice]]
    return [e for e in chosen if not only or any(v.name in only for v in e.variants)] or chosen


def check_only(experiments: Sequence[Experiment], only: Sequence[str] | None) -> None:
    """Raise ValueError naming any ``--only`` entry that is no variant of the selected experiments."""
    known = [v.name for e in experiments for v in e.variants]
    unknown = [name for name in only or () if name not in known]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)} for --experiment {'/'.join(e.name for e in experiments)}; "
            f"choose from: {' '.join(known)}"
        )


def budget_overrides(epochs: int, max_steps: int | None, extra: Sequence[str]) -> tuple[str, ...]:
    """Overrides shared by every run of an experiment: the epoch budget, the smoke-test step limit, ``--override``.

    A single epoch leaves no room for the recipe's warm-up epoch, so ``epochs == 1`` also sets no warm-up.
    """
    out = [f"train.epochs={epochs}", *NARROW_CNN, *VALIDATION_CLASSES]
    if epochs < 2:
        out.append("optim.warmup_epochs=0")
    if max_steps is not None:
        out.append(f"train.max_steps={max_steps}")
    return (*out, *extra)


# recallk's defaults when the stored results were made, where they have changed since (issues 29 and 30): every run
# of these benchmarks starts from them where its recipe leaves a key to the defaults (recorded_overrides), and the
# config digest compares with them, so a stored run keeps its key, and a changed default can never make an old
# result stand for a new setting (an arm that takes a new default gets a new digest, and runs).
RECORDED_DEFAULTS = {
    "data": {"batch_size": 4000},
    "model": {"freeze_batchnorm": False},
    "loss": {"tau_k": 1.0, "simix_pairs_per_class": None},
}


def recorded_overrides(config_path: Path) -> tuple[str, ...]:
    """``section.key=value`` for each of ``RECORDED_DEFAULTS`` that the recipe at ``config_path`` does not set."""
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    return tuple(f"{section}.{key}={json.dumps(value)}" for section, values in RECORDED_DEFAULTS.items()
                 for key, value in values.items() if key not in (raw.get(section) or {}))


def config_digest(config_path: Path, overrides: Sequence[str]) -> str:
    """First 16 hex digits of the SHA-256 of the resolved config's settings that differ from the defaults the
    stored results were made with (recallk's defaults with ``RECORDED_DEFAULTS``; ``output`` left out), as JSON. A
    new config field (with a default) added to recallk does not make earlier results stale.

    Loading the config also validates it: a bad ``--override`` raises ``ConfigError`` before any training.
    """
    from recallk.config import Config, config_to_dict, load_config

    resolved, defaults = config_to_dict(load_config(config_path, overrides)), config_to_dict(Config())
    for section, values in RECORDED_DEFAULTS.items():
        defaults[section].update(values)
    changed = {
        section: {key: value for key, value in values.items() if value != defaults[section].get(key)}
        if isinstance(values, dict) else values
        for section, values in resolved.items() if section != "output"
    }
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:16]


def plan_runs(experiment: Experiment, args: argparse.Namespace) -> list[PlannedRun]:
    """The runs to report, seed by seed (all variants of seed 0 first, so a partial benchmark compares them all)."""
    epochs = getattr(args, experiment.epochs_option)
    shared = budget_overrides(epochs, args.max_steps, args.override or ())
    variants = [v for v in experiment.variants if not args.only or v.name in args.only]
    recorded = recorded_overrides(args.config)
    runs = []
    for seed in args.seeds:
        for variant in variants:
            overrides = (*recorded, *variant.overrides, f"seed={seed}", *shared)
            runs.append(PlannedRun(experiment.name, variant, seed, overrides, config_digest(args.config, overrides)))
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# Results file


def results_path(out: Path, experiment: str, suffix: str) -> Path:
    return out / f"omniglot_{experiment}.{suffix}"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none when it does not exist); a torn last line from a killed writer is ignored."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{path} line {number} is not valid JSON; fix or delete that line") from None
    return records


def record_key(record: dict[str, Any]) -> tuple[str, int, str]:
    return record["variant"], record["seed"], record["config_digest"]


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record, sort_keys=False) + "\n")


def machine_info(device: str) -> dict[str, Any]:
    """CPU model (from /proc/cpuinfo), cores, torch version and threads, and the GPU when runs use one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Running


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def execute(run: PlannedRun, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train one run into ``<runs_dir>/<experiment>-<variant>-seed<seed>`` and return its record (run dir deleted)."""
    from recallk.config import load_config
    from recallk.engine.distributed import resolve_device
    from recallk.errors import TrainingDiverged
    from recallk.training.trainer import train

    config = load_config(args.config, [*run.overrides, *RUN_SETTINGS])
    run_dir = args.runs_dir / f"{run.experiment}-{run.variant.name}-seed{run.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run that was interrupted starts over
    record: dict[str, Any] = {
        "experiment": run.experiment, "variant": run.variant.name, "seed": run.seed,
        "config": os.path.relpath(args.config, REPO), "overrides": list(run.overrides),
        "config_digest": run.config_digest,
    }
    started = time.perf_counter()
    try:
        summary = train(config, run_dir=run_dir, progress=False)
    except TrainingDiverged as err:
        record.update(status="diverged", error=str(err))
    else:
        record.update(
            status="ok",
            metrics={name: summary[name] for name in METRICS},
            best_epoch=summary["best_epoch"], epochs=summary["epochs"], steps=summary["steps"],
            train_seconds=summary["train_seconds"],
        )
    census = run_dir / "census.jsonl"
    if census.is_file():  # output.census_every: the positive-pair census along training (rank_plateau.py)
        record["census"] = [json.loads(line) for line in census.read_text(encoding="utf-8").splitlines() if line]
    record.update(
        wall_seconds=round(time.perf_counter() - started, 2),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine_info(resolve_device(config.train.device).type),
        command=command,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def run_experiment(experiment: Experiment, args: argparse.Namespace, command: str) -> None:
    """Train every planned run of ``experiment`` that is not in its results file yet, appending as each ends."""
    path = results_path(args.out, experiment.name, "jsonl")
    runs = plan_runs(experiment, args)
    done = {record_key(r) for r in read_records(path)}
    for number, run in enumerate(runs, 1):
        tag = f"[{experiment.name} {number}/{len(runs)}] {run.variant.name} seed {run.seed}"
        if run.key in done:
            log(f"{tag}: skip (already in {path})")
            continue
        log(f"{tag}: start")
        record = execute(run, args, command)
        append_record(path, record)
        minutes = record["wall_seconds"] / 60
        if record["status"] == "ok":
            metrics = record["metrics"]
            log(f"{tag}: R@1 {100 * metrics['recall@1']:.1f}  MAP@R {100 * metrics['map@r']:.1f}  "
                f"({minutes:.1f} min)")
        else:
            log(f"{tag}: {record['status']} ({minutes:.1f} min): {record['error']}")


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Row:
    """The finished runs of one variant."""

    variant: Variant
    records: list[dict[str, Any]]  # status ok
    failed: list[dict[str, Any]]

    def values(self, metric: str) -> list[float]:
        return [r["metrics"][metric] for r in self.records]


def collect_rows(experiment: Experiment, args: argparse.Namespace) -> tuple[list[Row], int, int]:
    """Rows for the planned runs found in the results file, plus (planned runs, records with other settings)."""
    planned = plan_runs(experiment, args)
    by_key = {record_key(r): r for r in read_records(results_path(args.out, experiment.name, "jsonl"))}
    planned_keys = {run.key for run in planned}
    rows = []
    for variant in experiment.variants:
        found = [by_key[run.key] for run in planned if run.variant == variant and run.key in by_key]
        if found:
            rows.append(Row(variant, [r for r in found if r["status"] == "ok"],
                            [r for r in found if r["status"] != "ok"]))
    return rows, len(planned), sum(key not in planned_keys for key in by_key)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: Sequence[float]) -> str:
    """``"85.4 ± 0.3"`` in percent; ``"85.4"`` for one value; ``"–"`` for none."""
    if not values:
        return "–"
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def markdown_report(experiment: Experiment, rows: list[Row], planned: int, others: int,
                    args: argparse.Namespace, command: str) -> str:
    records = [r for row in rows for r in (*row.records, *row.failed)]
    machines = sorted({
        f"{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} threads"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        for m in (r["machine"] for r in records)
    })
    dates = sorted(r["date"] for r in records)
    run_commands = sorted({r["command"] for r in records} - {command})
    epochs = getattr(args, experiment.epochs_option)
    shared = budget_overrides(epochs, args.max_steps, args.override or ())
    split_overrides = [o for o in shared if o.startswith("data.split_test=")]
    test_split = (f"the split set by `{split_overrides[-1]}`" if split_overrides
                  else "the test split (Omniglot evaluation set: 659 unseen classes, 13,180 images)")
    lines = [
        f"# {experiment.title}",
        "",
        f"- Machine: {'; '.join(machines) or 'no runs yet'}",
        f"- Command: `{command}`" + "".join(f"; runs made by `{c}`" for c in run_commands),
        f"- Date: runs {dates[0][:10]} to {dates[-1][:10]}; report {datetime.date.today()}" if dates
        else f"- Date: report {datetime.date.today()}",
        f"- Budget: {epochs} epoch(s) per run, seeds {' '.join(map(str, args.seeds))}; {len(records)} of {planned} "
        f"planned runs present; shared overrides: `{' '.join(shared)}`",
        f"- Setting: {experiment.notes}",
        f"- Metrics: retrieval on {test_split}, with the checkpoint of the best validation MAP@R; "
        "mean ± sample std over seeds, in %.",
    ]
    if others:
        lines.append(f"- Not shown: {others} record(s) of the results file outside this selection "
                     "(other variants, seeds or settings).")
    lines += [
        "",
        *TABLE_HEADER,
    ]
    for row in rows:
        cells = [format_cell(row.values(metric)) for metric, _ in TABLE_METRICS]
        steps = f"{statistics.fmean(r['steps'] for r in row.records):.0f}" if row.records else "–"
        minutes = (f"{statistics.fmean(r['train_seconds'] for r in row.records) / 60:.1f}"
                   if row.records else "–")
        lines.append(f"| {row.variant.label} | " + " | ".join(cells) + f" | {len(row.records)} | {steps} | {minutes} |")
    for row in rows:
        for record in row.failed:
            lines.append(f"\n{row.variant.label} seed {record['seed']}: {record['status']}: {record['error']}")
    return "\n".join(lines) + "\n"


def plot_report(experiment: Experiment, rows: list[Row], path: Path) -> None:
    """Losses: bars of R@1 and MAP@R with std error bars and one dot per seed. Batch experiments: both against
    batch size, one line per loss (``Variant.series``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.records]
    by_batch = all(row.variant.batch_size for row in rows)
    fig, axes = plt.subplots(1, 2, figsize=(10 if by_batch else 12, 4.5))
    for ax, (metric, label) in zip(axes, (("recall@1", "R@1 (%)"), ("map@r", "MAP@R (%)"))):
        stats = [mean_std([100 * v for v in row.values(metric)]) for row in rows]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        if by_batch:
            xs = [row.variant.batch_size for row in rows]
            for series in dict.fromkeys(row.variant.series for row in rows):
                points = [(x, m, s) for x, m, s, row in zip(xs, means, stds, rows) if row.variant.series == series]
                ax.errorbar(*zip(*points), marker="o", capsize=4, label=f"{series} (mean ± std)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
            ax.set_xlabel("batch size")
            ax.legend(fontsize=8)
        else:
            xs = list(range(len(rows)))
            colors = ["tab:red" if row.variant.name.startswith("rsk") else "tab:gray" for row in rows]
            ax.bar(xs, means, yerr=stds, capsize=3, color=colors, alpha=0.8)
            ax.set_xticks(xs, [row.variant.label for row in rows], rotation=35, ha="right")
        seeds = [100 * v for row in rows for v in row.values(metric)]
        for x, row in zip(xs, rows):
            values = [100 * v for v in row.values(metric)]
            ax.scatter([x] * len(values), values, s=12, color="black", zorder=3)
        pad = max(2.0, 0.2 * (max(seeds) - min(seeds)))  # zoom in: the variants differ by a few points
        ax.set_ylim(max(0.0, min(seeds) - pad), min(100.0, max(seeds) + pad))
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(experiment.title + " (dots: seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(experiment: Experiment, args: argparse.Namespace, command: str) -> bool:
    """Write the markdown table and the plot of ``experiment``; False (and a message) when it has no runs."""
    rows, planned, others = collect_rows(experiment, args)
    if not rows:
        log(f"[{experiment.name}] no runs with these settings in "
            f"{results_path(args.out, experiment.name, 'jsonl')}; nothing to report")
        return False
    md_path = results_path(args.out, experiment.name, "md")
    md_path.write_text(markdown_report(experiment, rows, planned, others, args, command), encoding="utf-8")
    plot_report(experiment, rows, results_path(args.out, experiment.name, "png"))
    log(f"[{experiment.name}] wrote {md_path} and {md_path.with_suffix('.png')}")
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    all_variants = " ".join(v.name for e in EXPERIMENTS.values() for v in e.variants)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=f"variants: {all_variants}. Data: $RECALLK_DATA (e.g. ../shared/data) or a download.",
    )
    parser.add_argument("--experiment", choices=(*EXPERIMENTS, "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every run of 'losses' (default 3)")
    parser.add_argument("--batch-epochs", type=int, default=4, help="epochs of every run of 'batch' (default 4)")
    parser.add_argument("--large-batch-epochs", type=int, default=12,
                        help="epochs of every run of 'large_batch' (default 12)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run and report only these variants")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots from existing results")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="results folder (default benchmarks/results)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench",
                        help="scratch run directories, each deleted after its summary is read (default runs/bench)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="base recipe (default configs/omniglot.yaml)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE",
                        help="extra config override for every run, repeatable (e.g. train.device=cuda)")
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke tests)")
    args = parser.parse_args(argv)
    for name in (*(e.epochs_option for e in EXPERIMENTS.values()), "threads", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds must be non-negative integers, got {args.seeds}")
    try:
        check_only(selected_experiments(args.experiment), args.only)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/omniglot_quality.py", *(sys.argv[1:] if argv is None else argv)])
    experiments = selected_experiments(args.experiment, args.only)
    from recallk.errors import ConfigError

    try:
        for experiment in experiments:
            plan_runs(experiment, args)  # validates every run's config before any training
    except ConfigError as err:
        log(f"omniglot_quality.py: error: {err}")
        return 2
    if not args.report:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for experiment in experiments:
            run_experiment(experiment, args, command)
    reported = [report(experiment, args, command) for experiment in experiments]
    return 0 if any(reported) else 1


if __name__ == "__main__":
    sys.exit(main())
