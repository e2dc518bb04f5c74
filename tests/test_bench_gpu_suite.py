"""benchmarks/gpu_suite.py --quick: the GPU suite's sections run end to end at tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_suite_runs_every_section_and_writes_json_and_markdown(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(report["sections"]) == {"loss", "loss_trained", "loss_chunk_16", "loss_chunk_64", "multistage", "knn"}
    for name, section in report["sections"].items():
        assert section["returncode"] == 0, (name, section["error"])
        assert section["rows"], f"section {name} produced no table rows"
    loss_rows = report["sections"]["loss"]["rows"]
    implementations = {(row["N"], row["implementation"]) for row in loss_rows}
    assert {("256", "loop"), ("512", "recallk_simix"), ("512", "floor")} <= implementations
    assert ("512", "loop") not in implementations  # the loop stops at --small-max-n
    values = {row["loss"] for row in loss_rows if row["N"] == "256" and row["implementation"] in ("recallk", "loop")}
    assert len(values) == 1, f"recallk and the per-query loop disagree: {values}"
    trained = {row["implementation"]: row["loss"] for row in report["sections"]["loss_trained"]["rows"]}
    assert float(trained["recallk"]) < 0.8 < float(values.pop())  # trained-like clusters: a lower loss
    for chunk in (16, 64):  # the chunk changes the work's shape, not the value
        (row,) = report["sections"][f"loss_chunk_{chunk}"]["rows"]
        assert f"--query-chunk {chunk}" in report["sections"][f"loss_chunk_{chunk}"]["output"]
        assert float(row["loss"]) == pytest.approx(float(trained["recallk"]), abs=2e-6)
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "## loss" in markdown and "## multistage" in markdown and "## knn" in markdown


def test_full_suite_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr
