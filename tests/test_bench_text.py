"""benchmarks/text_quality.py as a real subprocess on a generated CLINC150-format fixture: each loss trains one
step, results are appended and skipped on rerun, the report covers only the current budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")

from data_fixtures import write_clinc_fixture  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "text_quality.py"


def run(*flags: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True, env=env,
                          timeout=600)


def test_text_benchmark_runs_resumes_and_reports(tmp_path: Path) -> None:
    write_clinc_fixture(tmp_path / "data")
    out = tmp_path / "results" / "text"
    flags = ["--data-dir", tmp_path / "data", "--datasets", "clinc150", "--seeds", "0", "--steps", "1",
             "--batch", "8", "--mini-batch", "3", "--out", out,
             "--variants", "rsk", "cmnrl", "batch_all_triplet"]
    first = run(*flags)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["variant"] for r in records] == ["frozen", "rsk", "cmnrl", "batch_all_triplet"]
    for record in records:
        assert 0 <= record["metrics"]["recall@1"] <= 1 and record["machine"]["torch"]
    assert all(r["budget"] == {"steps": 1, "batch": 8, "lr": 5e-5, "mini_batch": 3} for r in records)
    assert all(r["last_loss"] == r["first_loss"] for r in records[1:])  # one step each

    again = run(*flags)
    assert again.returncode == 0 and "seed 0 ..." not in again.stderr  # every run was skipped
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == len(records)
    table = out.with_suffix(".md").read_text()
    assert "| RS@k (CachedRecallAtKLoss) | 1 |" in table and "frozen MiniLM" in table
    assert out.with_suffix(".png").stat().st_size > 0

    other_budget = run(*flags[:-4], "--steps", "2", "--report")  # only the report, for a budget never run
    assert other_budget.returncode == 0
    assert "RS@k" not in out.with_suffix(".md").read_text()  # runs of another budget are left out


def test_bad_batch_is_refused() -> None:
    result = run("--batch", "12", "--report")
    assert result.returncode == 2 and "--batch must be a multiple of 8" in result.stderr


BATCH_SCRIPT = SCRIPT.with_name("text_batch.py")


def test_text_batch_sweep_scales_steps_lr_and_intents_then_resumes(tmp_path: Path) -> None:
    write_clinc_fixture(tmp_path / "data")  # 3 seen intents x 3 training sentences
    out = tmp_path / "results" / "batch"
    flags = ["--data-dir", tmp_path / "data", "--seeds", "0", "--batches", "8", "16", "--mini-batch", "3",
             "--variants", "rsk", "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, str(BATCH_SCRIPT), *map(str, flags)], capture_output=True, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["variant"], r["budget"]["batch"]) for r in records] == [("rsk", 8), ("rsk", 16)]
    budgets = {r["budget"]["batch"]: r["budget"] for r in records}
    assert budgets[8] == {"epochs": 1.0, "batch": 8, "steps": 2, "lr": 1.76777e-05, "mini_batch": 3,
                          "samples_per_class": 4}  # 5e-5 * sqrt(8 / 64); ceil(9 / 8) steps
    assert budgets[16]["steps"] == 1 and budgets[16]["samples_per_class"] == 8  # 16 / 4 = 4 intents > 3 seen
    table = out.with_suffix(".md").read_text()
    assert "| 16 | 2 x 8 | 1 | 2.5e-05 |" in table and out.with_suffix(".png").stat().st_size > 0

    again = subprocess.run([sys.executable, str(BATCH_SCRIPT), *map(str, flags)], capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 0 and "steps ..." not in again.stderr and "skip" in again.stderr
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2


def test_text_batch_refuses_bad_batches_in_one_line() -> None:
    result = subprocess.run([sys.executable, str(BATCH_SCRIPT), "--batches", "64", "6", "--report"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--batches must be multiples of 4 from 8 (got [6]) and --epochs positive (got 1.0)")
