"""benchmarks/gpu_suite.py --quick: the GPU suite's sections run end to end at tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
    # most wanted first, for a GPU lease that ends early
    assert list(report["sections"]) == ["train_omniglot", "train_jpeg", "loss_sync", "loss_trained", "ap_losses",
                                        "loss_chunk_16", "loss_chunk_64", "multistage", "loss", "knn"]
    for name, section in report["sections"].items():
        assert section["returncode"] == 0, (name, section["error"])
        assert section["rows"], f"section {name} produced no table rows"
    for name, arms in (("train_omniglot", ["eager"]), ("train_jpeg", ["eager_auto"])):  # the real recallk train
        rows = report["sections"][name]["rows"]
        assert [row["arm"] for row in rows] == arms and all(row["status"] == "ok" for row in rows), rows
        for row in rows:
            assert row["steps"] == "2" and float(row["loop img/s"]) > 0 and float(row["bare img/s"]) > 0
            assert float(row["first step s"]) > 0 and float(row["bare re-fwd+bwd s"]) > 0
            assert 0 <= float(row["test recall@1"]) <= 1
    summary = json.loads(Path("/tmp/recallk_train_loop/jpeg/eager_auto/summary.json").read_text())
    assert set(summary["phase_seconds"]) == {"first_step", "data", "forward_backward", "optimizer", "evaluation"}
    trained_rows = report["sections"]["loss_trained"]["rows"]
    implementations = {(row["N"], row["implementation"]) for row in trained_rows}
    assert {("256", "loop"), ("256", "recallk_simix"), ("512", "floor")} <= implementations
    assert ("512", "loop") not in implementations  # the loop stops at --small-max-n
    assert ("512", "recallk_simix") not in implementations  # SiMix stops at --simix-max-n on trained embeddings
    trained = {row["implementation"]: row["loss"] for row in trained_rows if row["N"] == "256"}
    assert float(trained["recallk"]) == pytest.approx(float(trained["loop"]), abs=2e-6), "recallk and the loop differ"
    for name in ("recallk", "recallk_simix"):  # both walks, same values
        assert float(trained[f"compact_{name}"]) == pytest.approx(float(trained[name]), abs=2e-6)
    sync_rows = report["sections"]["loss_sync"]["rows"]
    sync = {(row["loss"], row["walk"]): row["host reads inside the walk"] for row in sync_rows}
    losses = ("rs@k", "rs@k_simix", "smooth_ap", "fast_ap")
    assert len(sync) == 8 and all(sync[(loss, "sync_free")] == "none" for loss in losses)
    assert all(sync[(loss, "compact")] != "none" for loss in ("rs@k", "smooth_ap", "fast_ap"))  # the watch works
    random = {row["implementation"]: row["loss"] for row in report["sections"]["loss"]["rows"] if row["N"] == "256"}
    assert float(trained["recallk"]) < 0.8 < float(random["recallk"])  # trained-like clusters: a lower loss
    ap = {(row["N"], row["implementation"]) for row in report["sections"]["ap_losses"]["rows"]}
    assert ap == {(n, impl) for n in ("256", "512") for impl in ("smooth_ap", "compact_smooth_ap", "fast_ap",
                                                                 "compact_fast_ap")} | {("256", "pml_fast_ap")}
    # PML's FastAP (N x N x bins) only up to the middle size
    largest = next(row["loss"] for row in trained_rows if row["N"] == "512" and row["implementation"] == "recallk")
    for chunk in (16, 64):  # the chunk changes the work's shape, not the value
        rows = {(row["N"], row["implementation"]): row for row in report["sections"][f"loss_chunk_{chunk}"]["rows"]}
        assert set(rows) == {("256", "recallk"), ("256", "recallk_simix"), ("512", "recallk")}
        assert f"--query-chunk {chunk}" in report["sections"][f"loss_chunk_{chunk}"]["output"]
        assert float(rows[("512", "recallk")]["loss"]) == pytest.approx(float(largest), abs=2e-6)
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


def test_a_stopped_section_keeps_its_rows_and_leaves_no_process_behind(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "slow_bench.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('| N | time (s) |'); print('|---|---|'); print('| 256 | 0.5 |', flush=True)\n"
        "time.sleep(120)\n"
    )
    result = gpu_suite.run_section([str(script)], timeout=5)
    assert result["returncode"] == -1 and result["error"] == "stopped after 5 s"
    assert result["rows"] == [{"N": "256", "time (s)": "0.5"}], "the rows printed before the stop are kept"
    child = int(pid_file.read_text())
    for _ in range(50):  # the measuring process it started is killed with it (reaped by init shortly after)
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the section's child process {child} is still running")


def test_a_spent_budget_skips_the_sections_and_fails_the_suite(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--quick", "--out", str(tmp_path),
         "--only", "loss", "knn", "--budget", "0"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert done.returncode == 1 and list(report["sections"]) == ["loss", "knn"]
    assert all(section["error"] == "skipped: the --budget was spent" for section in report["sections"].values())
    assert "loss: skipped (budget spent)" in done.stdout
