"""benchmarks/pretrained_quality.py: every planned run's config validates, the stated learning-rate rule, the demo
arms train the shipped recipes unchanged, and the command line refuses unknown variants (no training here: one
run fine-tunes EfficientNet-Lite0 for minutes; tests/test_packaged_weights.py covers the weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from run_fixtures import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pretrained_quality.py"


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    return load_benchmark(SCRIPT)  # it imports its sibling benchmarks


def test_every_planned_run_validates_with_distinct_configs(driver: ModuleType) -> None:
    args = driver.parse_args(["--experiment", "all", "--seeds", "0", "1"])
    runs = [run for experiment in args.experiments for _, run in driver.plan_runs(experiment, args)]
    assert len(runs) == 2 * (2 + 9 + 8 + 6 + 6 + 8)  # demo, losses, batch, simix_pairs, tau_k, batch_bn
    assert len({(run.experiment, run.config_digest) for run in runs}) == len(runs)


def test_study_arms_reuse_the_batch_runs_and_differ_where_they_should(driver: ModuleType) -> None:
    """Issue 30's tables repeat the batch experiment's arms (same name and config, so their runs are reused, not
    trained again); the new arms change exactly what they study."""
    from recallk.config import load_config

    def plan(experiment: str) -> dict:
        args = driver.parse_args(["--experiment", experiment, "--seeds", "0"])
        return {arm.name: (arm, run) for arm, run in driver.plan_runs(experiment, args)}

    batch, simix, tau = plan("batch"), plan("simix_pairs"), plan("tau_k")
    for name in ("bs256", "bs1024", "bs256_simix", "bs1024_simix"):
        assert simix.get(name, tau.get(name))[1].key == batch[name][1].key
    def config(arm_and_run: tuple):
        arm, run = arm_and_run
        return load_config(arm.config, run.overrides)

    six = config(simix["bs1024_simix_pairs6"])
    assert (six.loss.simix, six.loss.simix_pairs_per_class, six.data.batch_size) == (True, 6, 1024)
    all_pairs = config(simix["bs1024_simix"])
    assert all_pairs.loss.simix_pairs_per_class is None  # as the stored runs were made, whatever the default
    tauk, anneal = config(tau["bs256_tauk"]), config(tau["bs1024_anneal"])
    assert tauk.loss.tau_k == (1.0, 2.0, 4.0, 8.0, 16.0) and tauk.loss.tau_k_start is None
    assert (anneal.loss.tau_k, anneal.loss.tau_k_start, anneal.loss.tau_k_anneal_epochs) == (1.0, 1024.0, 0.5)


def test_batch_rule_and_demo_arms(driver: ModuleType) -> None:
    from recallk.config import load_config

    recipe_lr = load_config(driver.RECIPE).optim.lr
    assert [driver.sqrt_scaled_lr(b) / recipe_lr for b in (64, 256, 1024, 4096)] == [0.5, 1.0, 2.0, 4.0]
    args = driver.parse_args(["--experiment", "batch", "--only", "bs4096_simix", "--seeds", "0"])
    ((arm, run),) = driver.plan_runs("batch", args)
    config = load_config(arm.config, run.overrides)
    assert (config.data.batch_size, config.optim.lr, config.loss.simix) == (4096, float(f"{4 * recipe_lr:.6g}"), True)
    assert config.model.freeze_batchnorm and config.train.chunk_size == 256 and config.train.epochs == 1
    args = driver.parse_args(["--experiment", "batch_bn", "--only", "bs64_bn", "--seeds", "0"])
    ((arm, run),) = driver.plan_runs("batch_bn", args)
    config = load_config(arm.config, run.overrides)  # BatchNorm training keeps the rate chosen for it, 1e-2 at 256
    assert (config.optim.lr, config.model.freeze_batchnorm, config.train.chunk_size) == (5e-3, False, 64)
    only_random = driver.parse_args(["--experiment", "losses", "--only", "rsk_random_init", "--seeds", "0"])
    ((arm, run),) = driver.plan_runs("losses", only_random)
    assert load_config(arm.config, run.overrides).model.pretrained_path is None  # the no-ImageNet control
    demo = driver.plan_runs("demo", driver.parse_args(["--experiment", "demo", "--seeds", "0"]))
    assert [load_config(arm.config, run.overrides).train.epochs for arm, run in demo] == [24, 1]


def test_unknown_variant_is_refused() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "rsk_typo"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 2 and "unknown variant(s) rsk_typo" in done.stderr


def test_frozen_feature_table_has_backbone_and_pixel_rows(tmp_path: Path) -> None:
    data = Path(os.environ.get("RECALLK_DATA") or REPO.parent / "shared" / "data")
    if not (data / "omniglot" / "images_evaluation.zip").is_file():
        pytest.skip(f"Omniglot is not in {data / 'omniglot'}; set RECALLK_DATA to a folder holding omniglot/")
    out = tmp_path / "frozen.md"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("pretrained_frozen.py")), "--sizes", "28",
                           "--max-classes", "10", "--data-dir", str(data), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 28 px")]
    assert [row[1] for row in rows] == ["EfficientNet-Lite0 ImageNet, frozen, average-pooled, 1280-d",
                                        "raw pixels, 784-d"]
    assert all(0.0 < float(value) <= 1.0 for row in rows for value in row[2:6])  # recall@1..8 of 200 queries


def test_report_counts_many_run_commands_instead_of_listing_them(driver: ModuleType, tmp_path: Path) -> None:
    args = driver.parse_args(["--experiment", "losses", "--seeds", "0", "--out", str(tmp_path), "--report"])
    machine = {"cpu": "cpu", "cpu_count": 2, "torch": "t", "threads": 1}
    metrics = {"recall@1": 0.5, "recall@2": 0.6, "recall@4": 0.7, "recall@8": 0.8, "map@r": 0.2}
    for number, (arm, run) in enumerate(driver.plan_runs("losses", args)):
        driver.oq.append_record(tmp_path / "pretrained_losses.jsonl", {
            "variant": arm.name, "seed": 0, "config_digest": run.config_digest, "status": "ok", "metrics": metrics,
            "steps": 59, "train_seconds": 60.0, "date": "2026-12-03T00:00:00", "machine": machine,
            "command": f"python benchmarks/pretrained_quality.py --only {arm.name}" if number < 4 else "same"})
    assert driver.report("losses", args, "report")
    text = (tmp_path / "pretrained_losses.md").read_text()
    assert "runs made by 5 commands (one or a few variants each;" in text and "--only rsk`" not in text
    assert text.count("| 50.0 |") == 9  # every arm's row
    assert driver.made_by([{"command": "a"}, {"command": "b"}], tmp_path / "x.jsonl") == "`a`, `b`"
