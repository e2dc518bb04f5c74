"""benchmarks/pretrained_quality.py: every planned run's config validates, the stated learning-rate rule, the demo
arms train the shipped recipes unchanged, and the command line refuses unknown variants (no training here: one
run fine-tunes EfficientNet-Lite0 for minutes; tests/test_packaged_weights.py covers the weights)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pretrained_quality.py"


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports omniglot_quality from its own folder
    try:
        spec = importlib.util.spec_from_file_location("pretrained_quality", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_every_planned_run_validates_with_distinct_configs(driver: ModuleType) -> None:
    args = driver.parse_args(["--experiment", "all", "--seeds", "0", "1"])
    runs = [run for experiment in args.experiments for _, run in driver.plan_runs(experiment, args)]
    assert len(runs) == 2 * (2 + 7 + 8)
    assert len({(run.experiment, run.config_digest) for run in runs}) == len(runs)


def test_batch_rule_and_demo_arms(driver: ModuleType) -> None:
    from recallk.config import load_config

    assert [round(driver.sqrt_scaled_lr(b), 6) for b in (64, 256, 1024, 4096)] == [5e-4, 1e-3, 2e-3, 4e-3]
    args = driver.parse_args(["--experiment", "batch", "--only", "bs4096_simix", "--seeds", "0"])
    ((arm, run),) = driver.plan_runs("batch", args)
    config = load_config(arm.config, run.overrides)
    assert (config.data.batch_size, config.optim.lr, config.loss.simix) == (4096, 4e-3, True)
    assert config.model.freeze_batchnorm and config.train.chunk_size == 256 and config.train.epochs == 2
    demo = driver.plan_runs("demo", driver.parse_args(["--experiment", "demo", "--seeds", "0"]))
    assert [load_config(arm.config, run.overrides).train.epochs for arm, run in demo] == [24, 2]


def test_unknown_variant_is_refused() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "rsk_typo"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 2 and "unknown variant(s) rsk_typo" in done.stderr
