"""RunDirectory and its lock, and the learning-rate schedules, tested directly (without a training run)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from recallk.errors import RecallkUsageError
from recallk.files import read_metrics
from recallk.training.run_dir import OWNER_MARKER, RunDirectory, check_run_dir, run_dir_in_use
from recallk.training.schedule import lr_multiplier

HOLD_LOCK = """
import sys, time
from recallk.training.run_dir import RunDirectory
with RunDirectory(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_metrics_rows_extend_the_header_and_truncate(tmp_path: Path) -> None:
    with RunDirectory(tmp_path / "run") as run:
        run.append_metrics({"epoch": 1, "step": 4, "train_loss": 0.5})
        run.append_metrics({"epoch": 2, "step": 8, "train_loss": 0.25, "val_recall@1": 0.75})
        rows = read_metrics(run.path / "metrics.csv")
        assert rows == [
            {"epoch": "1", "step": "4", "train_loss": "0.5", "val_recall@1": ""},
            {"epoch": "2", "step": "8", "train_loss": "0.25", "val_recall@1": "0.75"},
        ]
        run.truncate_metrics(7)
        assert [r["epoch"] for r in read_metrics(run.path / "metrics.csv")] == ["1"]
        run.truncate_metrics(0)
        assert not (run.path / "metrics.csv").exists()


def test_a_run_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunDirectory(path) as run:
        run.write_json("summary.json", {"done": True})
    with pytest.raises(RecallkUsageError, match="already holds a run .*summary.json.*--resume"):
        RunDirectory(path)
    with pytest.raises(RecallkUsageError, match="cannot resume: .*last.pt does not exist"):
        check_run_dir(path, resume=True)
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "last.pt").write_bytes(b"")
    RunDirectory(path, resume=True).close()


def test_partial_writes_of_a_crash_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir()
    (path / OWNER_MARKER).touch()  # a directory recallk created for a run that crashed
    (path / ".metrics.csv.abc123.tmp").write_text("half")
    (path / "notes.txt").write_text("kept")
    RunDirectory(path).close()
    assert sorted(p.name for p in path.iterdir()) == [".lock", OWNER_MARKER, "notes.txt"]


def test_the_lock_refuses_a_second_process_and_is_released(tmp_path: Path) -> None:
    path = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert run_dir_in_use(path)
        assert (path / ".lock").read_text() == str(holder.pid)
        with pytest.raises(RecallkUsageError, match="in use by another recallk process"):
            RunDirectory(path)
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    assert not run_dir_in_use(path)
    RunDirectory(path).close()


def test_constant_schedule_with_warmup() -> None:
    f = lr_multiplier("none", total_epochs=10, warmup_epochs=2)
    assert f(0.0) == pytest.approx(0.0, abs=1e-9)
    assert f(1.0) == pytest.approx(0.5)
    assert f(2.0) == f(7.5) == 1.0


def test_cosine_schedule_decays_to_zero() -> None:
    f = lr_multiplier("cosine", total_epochs=4)
    assert [f(e) for e in (0, 2, 4, 6)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert f(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_step_schedule_multiplies_by_gamma_at_each_step() -> None:
    f = lr_multiplier("step", total_epochs=10, step_epochs=(3, 6), gamma=0.1)
    assert [f(e) for e in (0, 2.99, 3, 5.5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_unknown_schedule_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*did you mean 'cosine'"):
        lr_multiplier("cosin", total_epochs=1)
