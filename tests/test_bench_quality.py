"""benchmarks/omniglot_quality.py: real subprocess runs on real Omniglot (one or two steps each), resuming,
reporting, variant filtering; plus the GroupNorm option of the Omniglot CNN that its batch ablation relies on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from recallk.config import load_config
from recallk.engine.batchnorm import batchnorm_layers_in_training_mode
from recallk.errors import ConfigError, RecallkUsageError
from recallk.losses.factory import BASELINES, LOSS_NAMES
from recallk.models import SmallCNN, create_model
from recallk.models.small_cnn import group_count

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "omniglot_quality.py"
DATA = Path(os.environ.get("RECALLK_DATA") or REPO.parent / "shared" / "data")
# Two variants, one step each, with a narrow CNN, scored on the 600 validation images instead of the 13,180 test
# images; bs1024 (chunks of 256) goes through the multistage engine with the GroupNorm CNN.
SMOKE_FLAGS = ["--only", "rsk", "bs1024", "--seeds", "0", "--max-steps", "1",
               "--override", "data.split_test=[val]", "--override", "model.widths=[8,16,32]"]


def run_driver(*flags: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECALLK_DATA": str(DATA)}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("omniglot_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path, Path, subprocess.CompletedProcess]:
    """One real benchmark invocation: losses/rsk and batch/bs1024, seed 0."""
    if not (DATA / "omniglot").is_dir():
        pytest.skip(f"Omniglot is not in {DATA / 'omniglot'}; set RECALLK_DATA to a folder holding omniglot/")
    root = tmp_path_factory.mktemp("bench")
    flags = [*SMOKE_FLAGS, "--out", root / "results", "--runs-dir", root / "runs"]
    return flags, root / "results", root / "runs", run_driver(*flags)


def test_each_finished_run_appends_one_json_line(smoke) -> None:
    _, out, runs_dir, result = smoke
    assert result.returncode == 0, result.stderr
    (rsk,) = read_lines(out / "omniglot_losses.jsonl")  # --only: no other loss ran
    (bs1024,) = read_lines(out / "omniglot_batch.jsonl")
    assert (rsk["experiment"], rsk["variant"], rsk["seed"], rsk["status"]) == ("losses", "rsk", 0, "ok")
    assert (bs1024["experiment"], bs1024["variant"], bs1024["status"]) == ("batch", "bs1024", "ok")
    for record in (rsk, bs1024):
        assert set(record["metrics"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
        assert 0 < record["metrics"]["recall@1"] <= record["metrics"]["recall@8"] <= 1
        assert record["steps"] == 1 and record["train_seconds"] > 0
        assert {"cpu", "torch", "threads", "device"} <= set(record["machine"])
        assert record["date"] and "omniglot_quality.py" in record["command"] and len(record["config_digest"]) == 16
    assert {"loss.name=rsk", "seed=0", "train.epochs=3", "train.max_steps=1"} <= set(rsk["overrides"])
    assert {"model.norm=group", "train.chunk_size=256", "data.batch_size=1024", "train.epochs=4"} <= set(
        bs1024["overrides"])
    assert rsk["overrides"][-1] == bs1024["overrides"][-1] == "model.widths=[8,16,32]"  # --override comes last
    assert list(runs_dir.iterdir()) == []  # run directories are deleted once read
    assert "rsk seed 0: start" in result.stderr and "bs1024 seed 0: R@1" in result.stderr


def test_a_rerun_skips_finished_runs(smoke) -> None:
    flags, out, _, first = smoke
    assert first.returncode == 0, first.stderr
    again = run_driver(*flags)
    assert again.returncode == 0, again.stderr
    assert "start" not in again.stderr and again.stderr.count("skip") == 2
    assert len(read_lines(out / "omniglot_losses.jsonl")) == len(read_lines(out / "omniglot_batch.jsonl")) == 1


def test_report_alone_writes_the_table_and_the_plot(smoke) -> None:
    flags, out, _, first = smoke
    assert first.returncode == 0, first.stderr
    for suffix in ("md", "png"):
        (out / f"omniglot_losses.{suffix}").unlink()
    result = run_driver(*flags, "--report")
    assert result.returncode == 0, result.stderr
    table = (out / "omniglot_losses.md").read_text()
    r_at_1 = 100 * read_lines(out / "omniglot_losses.jsonl")[0]["metrics"]["recall@1"]
    assert f"| RS@k | {r_at_1:.1f} |" in table and "--report" in table
    assert (out / "omniglot_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_variant_names_fail_with_the_known_ones() -> None:
    result = run_driver("--experiment", "losses", "--only", "rsk", "nosuch")
    assert result.returncode == 2
    assert "unknown variant(s) nosuch" in result.stderr and "rsk_simix" in result.stderr


def test_a_bad_override_fails_before_any_training(tmp_path: Path) -> None:
    result = run_driver("--only", "rsk", "--override", "train.epochz=3", "--out", tmp_path)
    assert result.returncode == 2 and "train.epochz" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_loss_variants_cover_every_loss_of_the_factory(driver: ModuleType) -> None:
    assert driver.BASELINE_LOSSES == BASELINES
    names = {v.overrides[0].removeprefix("loss.name=") for v in driver.LOSS_VARIANTS}
    assert names == set(LOSS_NAMES)
    proxies = [v for v in driver.LOSS_VARIANTS if "optim.loss_lr_mult=100" in v.overrides]
    assert [v.name for v in proxies] == ["normalized_softmax_proxy_lr100", "proxy_anchor_proxy_lr100"]


def test_batch_variants_are_valid_configs_with_chunked_large_batches(driver: ModuleType) -> None:
    args = driver.parse_args(["--experiment", "batch", "--seeds", "0"])
    for run in driver.plan_runs(driver.EXPERIMENTS["batch"], args):
        config = load_config(driver.DEFAULT_CONFIG, run.overrides)
        assert config.model.norm == "group" and config.train.chunk_size == 256
        assert config.data.batch_size // config.data.samples_per_class <= 934  # training classes


def fake_record(run, recall_at_1: float, status: str = "ok") -> dict:
    metrics = dict.fromkeys(("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"), recall_at_1)
    record = {"experiment": run.experiment, "variant": run.variant.name, "seed": run.seed,
              "overrides": list(run.overrides), "config_digest": run.config_digest, "status": status,
              "date": "2026-01-02T03:04:05+00:00",
              "machine": {"cpu": "test cpu", "cpu_count": 2, "torch": "x", "threads": 2, "device": "cpu"},
              "command": "python benchmarks/omniglot_quality.py"}
    if status == "ok":
        record.update(metrics=metrics, steps=10, train_seconds=120.0)
    else:
        record["error"] = "the loss became nan at step 3"
    return record


def test_report_averages_seeds_in_variant_order_and_leaves_out_other_settings(driver, tmp_path: Path) -> None:
    args = driver.parse_args(["--experiment", "losses", "--only", "triplet", "rsk", "--seeds", "0", "1",
                              "--out", str(tmp_path)])
    experiment = driver.EXPERIMENTS["losses"]
    runs = {(r.variant.name, r.seed): r for r in driver.plan_runs(experiment, args)}
    other_budget = driver.plan_runs(experiment, driver.parse_args(["--only", "rsk", "--seeds", "0", "--epochs", "9"]))
    path = tmp_path / "omniglot_losses.jsonl"
    for record in (fake_record(runs["triplet", 0], 0.4), fake_record(runs["rsk", 0], 0.5),
                   fake_record(runs["rsk", 1], 0.7), fake_record(runs["triplet", 1], 0.0, "diverged"),
                   fake_record(other_budget[0], 0.99)):
        driver.append_record(path, record)
    assert driver.report(experiment, args, "python benchmarks/omniglot_quality.py --report")
    table = (tmp_path / "omniglot_losses.md").read_text()
    assert "| RS@k | 60.0 ± 14.1 |" in table and "| 2 | 10 | 2.0 |" in table
    assert "| triplet | 40.0 |" in table and table.index("| RS@k |") < table.index("| triplet |")
    assert "triplet seed 1: diverged" in table and "99.0" not in table and "Not shown: 1 record" in table
    assert "4 of 4 planned runs" in table
    assert (tmp_path / "omniglot_losses.png").stat().st_size > 0


def test_batch_report_plots_against_batch_size(driver, tmp_path: Path) -> None:
    args = driver.parse_args(["--experiment", "batch", "--only", "bs64", "bs4096", "--seeds", "0", "--out",
                              str(tmp_path)])
    experiment = driver.EXPERIMENTS["batch"]
    for run, value in zip(driver.plan_runs(experiment, args), (0.6, 0.8)):
        driver.append_record(tmp_path / "omniglot_batch.jsonl", fake_record(run, value))
    assert driver.report(experiment, args, "cmd")
    table = (tmp_path / "omniglot_batch.md").read_text()
    assert table.index("| batch 64 | 60.0 |") < table.index("| batch 4096 | 80.0 |")
    assert (tmp_path / "omniglot_batch.png").stat().st_size > 0


def test_large_batch_compares_the_chunked_losses_at_each_size(driver, tmp_path: Path) -> None:
    """Every chunked loss at 1024 and 4096 with the batch experiment's model; one plot line per loss."""
    experiment = driver.EXPERIMENTS["large_batch"]
    args = driver.parse_args(["--experiment", "large_batch", "--seeds", "0", "--out", str(tmp_path)])
    runs = driver.plan_runs(experiment, args)
    configs = [load_config(driver.DEFAULT_CONFIG, run.overrides) for run in runs]
    assert {(c.loss.name, c.data.batch_size) for c in configs} == {
        (name, size) for name in ("rsk", "smooth_ap", "fast_ap") for size in (1024, 4096)}
    assert all(c.model.norm == "group" and c.train.chunk_size == 256 and c.train.epochs == 12 for c in configs)
    for run, value in zip(runs, (0.5, 0.2, 0.4, 0.1, 0.3, 0.05)):
        driver.append_record(tmp_path / "omniglot_large_batch.jsonl", fake_record(run, value))
    import matplotlib.pyplot as plt

    saved = []
    real_savefig = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k))[1]
    try:
        assert driver.report(experiment, args, "cmd")
    finally:
        plt.Figure.savefig = real_savefig
    table = (tmp_path / "omniglot_large_batch.md").read_text()
    assert "| RS@k, batch 1024 | 50.0 |" in table and "| FastAP, batch 4096 | 5.0 |" in table
    legend = [text.get_text() for text in saved[0].axes[0].get_legend().get_texts()]
    assert legend == ["RS@k (mean ± std)", "Smooth-AP (mean ± std)", "FastAP (mean ± std)"]
    assert [list(bars.lines[0].get_xdata()) for bars in saved[0].axes[0].containers] == [[1024, 4096]] * 3


def test_report_without_results_says_so(tmp_path: Path) -> None:
    result = run_driver("--report", "--out", tmp_path)
    assert result.returncode == 1 and "nothing to report" in result.stderr



def test_results_are_reused_only_for_the_same_resolved_config(driver, tmp_path: Path) -> None:
    edited = tmp_path / "omniglot.yaml"
    edited.write_text(driver.DEFAULT_CONFIG.read_text().replace("lr: 3.0e-3", "lr: 1.0e-3"))
    digest = driver.config_digest(driver.DEFAULT_CONFIG, ["seed=0"])
    assert driver.config_digest(driver.DEFAULT_CONFIG, ["seed=0", "output.plots=false"]) == digest
    assert driver.config_digest(driver.DEFAULT_CONFIG, ["seed=0", "optim.loss_lr_mult=1"]) == digest  # a default
    assert driver.config_digest(driver.DEFAULT_CONFIG, ["seed=1"]) != digest
    assert driver.config_digest(edited, ["seed=0"]) != digest


# ---------------------------------------------------------------------------------------------------------------------
# model.norm=group


def test_group_count_keeps_at_most_32_groups_of_at_least_4_channels() -> None:
    assert [group_count(w) for w in (4, 8, 32, 48, 64, 128, 256, 30)] == [1, 2, 8, 12, 16, 32, 32, 6]


def test_group_norm_cnn_has_no_batch_statistics() -> None:
    torch.manual_seed(0)
    model = create_model("omniglot_cnn", embed_dim=8, widths=(8, 16), pooling="avg", layernorm=False,
                         norm="group").train()
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [m.num_groups for m in norms] == [2, 4]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert batchnorm_layers_in_training_mode(model) == []
    images = torch.rand(6, 1, 12, 12)
    with torch.no_grad():  # in training mode, each image's embedding does not depend on the rest of the batch
        torch.testing.assert_close(model(images[:2]), model(images)[:2])
        batchnorm = create_model("omniglot_cnn", embed_dim=8, widths=(8, 16), pooling="avg").train()
        assert not torch.allclose(batchnorm(images[:2]), batchnorm(images)[:2])


def test_norm_option_is_checked() -> None:
    assert load_config(None, ["model.backbone=omniglot_cnn", "model.norm=group"]).model.norm == "group"
    assert load_config(None).model.norm == "batch"
    with pytest.raises(ConfigError, match="model.norm"):
        load_config(None, ["model.norm=layer"])
    with pytest.raises(RecallkUsageError, match="omniglot_cnn only"):
        create_model("resnet18", norm="group")
    with pytest.raises(ValueError, match="unknown norm"):
        SmallCNN(1, (8,), norm="layer")
