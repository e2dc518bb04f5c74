"""`torchrun --nproc_per_node=2 -m recallk train` (gloo, CPU) trains the same model as one process, and a job whose
rank dies ends at once with a clear message and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recallk.config import save_config
from recallk.training.checkpoint import load_checkpoint

from data_fixtures import make_glyph_folder
from run_fixtures import free_port, tiny_config


@pytest.mark.parametrize("simix", [False, True])
def test_two_process_training_matches_one_process(tmp_path: Path, simix: bool) -> None:
    """RS@k sharded over two ranks (SiMix: one draw per step from run seed + step) trains the same weights."""
    data = make_glyph_folder(tmp_path / "data")
    config = save_config(
        tiny_config(
            tmp_path, train__epochs=1, data__split_val=None, output__plots=False, loss__simix=simix,
            loss__simix_pairs_per_class=1 if simix else None,
        ),
        tmp_path / "tiny.yaml",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["-m", "recallk", "train", str(config), "--data-dir", str(data), "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    two = subprocess.run([*torchrun, *common, "--run-dir", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--run-dir", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "summary.json").is_file()


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (read from /proc, as a job scheduler would see it)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True)
    for pid in map(int, children.stdout.split()):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children.stdout.split()}")


def test_a_killed_rank_ends_the_job_with_a_clear_message_and_resume_continues(tmp_path: Path) -> None:
    """SIGKILL one of two torchrun workers mid-run: the other stops at once with one clear line naming the resume
    command (not a hang in the next all-gather), and --resume finishes the run from the last checkpoint."""
    data = make_glyph_folder(tmp_path / "data")
    epochs = 40  # long enough to be killed mid-run: 4 steps per epoch
    config = save_config(tiny_config(tmp_path, train__epochs=epochs, output__plots=False), tmp_path / "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"

    def torchrun(*args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "recallk", "train", *args]

    stderr = tmp_path / "killed.err"
    with open(stderr, "w") as err_file:
        job = subprocess.Popen(torchrun(str(config), "--data-dir", str(data), "--device", "cpu", "--run-dir", str(run)),
                               env=env, stdout=subprocess.DEVNULL, stderr=err_file)
        try:
            while not (run / "checkpoints" / "last.pt").exists():
                assert job.poll() is None, stderr.read_text()[-3000:]
                time.sleep(0.02)
            os.kill(_rank_pid(job, 1), signal.SIGKILL)
            returncode = job.wait(timeout=120)  # a hang guard, not a timing assertion
        finally:
            if job.poll() is None:
                job.kill()
    text = stderr.read_text()
    assert returncode != 0
    ours = [line for line in text.splitlines() if line.startswith("recallk: error:")]
    assert len(ours) == 1 and "PeerProcessFailed: rank 0: another process of this torchrun job" in ours[0], text[-3000:]
    assert f"'train --resume {run}'" in ours[0]
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 0 < killed_at < epochs * 4 and not (run / "summary.json").exists()

    resumed = subprocess.run(torchrun("--resume", str(run)), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == epochs * 4
    assert json.loads((run / "summary.json").read_text())["epochs"] == epochs
