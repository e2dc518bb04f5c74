"""Faults injected into real ``recallk`` runs: bad input, interruption, crashes, full disks and untrusted files.

Every command runs as its own process (see ``reliability_helpers``: forked from a launcher that imported torch once,
or a fresh ``python -m recallk`` where nothing heavy is imported) on a tiny image folder, and the test checks what a
user would see: the exit status, one clear ``recallk:`` line on stderr without a traceback, and the files left in
the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from recallk.files import read_metrics
from recallk.training.checkpoint import FORMAT, load_checkpoint

from data_fixtures import make_glyph_folder
from reliability_helpers import Finished, Launcher

# 12 classes x 6 glyphs per split; batches of 8 classes x 2 -> 4 steps per epoch, 8 steps in all.
STEPS_PER_EPOCH, EPOCHS = 4, 2
CONFIG = {
    "name": "faults",
    "seed": 3,
    "data": {
        "dataset": "folder", "split_train": "train", "split_val": "test", "split_test": ["test"], "image_size": 16,
        "transform": "omniglot", "batch_size": 16, "samples_per_class": 2, "num_workers": 0,
    },
    "model": {
        "backbone": "omniglot_cnn", "widths": [8, 16], "embed_dim": 16, "pooling": "avg", "freeze_batchnorm": True,
    },
    "loss": {"name": "rsk", "k": [1, 2, 4]},
    "optim": {"lr": 3e-3, "schedule": "cosine"},
    "train": {"epochs": EPOCHS, "chunk_size": 6, "device": "cpu"},
    "eval": {"k": [1, 2], "batch_size": 32},
    "output": {"plots": False},
}


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "faults.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path_factory.mktemp("launcher"), cwd=tmp_path_factory.mktemp("cwd"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def reference(launcher: Launcher, config: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that nothing disturbed: what interrupted and resumed runs must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = launcher.run("train", config, "--run-dir", run, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(run / "metrics.csv")) == EPOCHS
    return run


def recallk_fresh(*args: object, cwd: Path) -> Finished:
    """``python -m recallk ARGS`` in a new interpreter (for failures that happen before torch is imported)."""
    done = subprocess.run(
        [sys.executable, "-m", "recallk", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    return Finished(done.returncode, done.stdout, done.stderr)


def error_line(result: Finished, status: int, *fragments: str, only_line: bool = True) -> str:
    """The single ``recallk: error:`` line: exit ``status``, no traceback, the line last on stderr.

    ``only_line``: nothing else on stderr either (the failure came before any progress output).
    """
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("recallk:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    if only_line:
        assert len(lines) == 1, result.stderr
    assert errors[0].startswith("recallk: error: "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def results_in(run: Path) -> list[str]:
    """Files in ``run`` that could be mistaken for (part of) a run's results: metrics, summaries, checkpoints, plots."""
    kinds = {".csv", ".json", ".pt", ".npz", ".png"}
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.suffix in kinds)


def train_losses(run: Path) -> list[str]:
    return [row["train_loss"] for row in read_metrics(run / "metrics.csv")]


def files_and_times(run: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f} s"
        time.sleep(0.02)


def copy_run(run: Path, into: Path) -> Path:
    return Path(shutil.copytree(run, into / run.name, ignore=shutil.ignore_patterns(".lock")))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing created


@pytest.mark.parametrize(
    ("text", "overrides", "fragments"),
    [
        ("data:\n  batch_size: [16\n", [], ["malformed YAML", "line 3"]),
        ("optim:\n  wieght_decay: 0.1\n", [], ["'optim.wieght_decay'", "did you mean 'optim.weight_decay'"]),
        ("train:\n  epochs: three\n", [], ["'train.epochs'", "expected an integer"]),
        (None, ["data.batch_size=15"], ["not a multiple of data.samples_per_class=2", "14 or 16"]),
    ],
    ids=["malformed-yaml", "unknown-key", "wrong-type", "batch-not-multiple"],
)
def test_bad_config_creates_nothing(
    tmp_path: Path, config: Path, data_dir: Path, text: str | None, overrides: list[str], fragments: list[str]
) -> None:
    if text is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    result = recallk_fresh("train", config, "--run-dir", run, "--data-dir", data_dir, *overrides, cwd=tmp_path)
    error_line(result, 2, *fragments)
    assert not run.exists()


def _missing_data_dir(root: Path, data_dir: Path) -> tuple[Path, list[str], list[str]]:
    return root / "nowhere", [], [f"data directory {root / 'nowhere'} does not exist", "--data-dir"]


def _split_file_names_missing_images(root: Path, data_dir: Path) -> tuple[Path, list[str], list[str]]:
    images = Path(shutil.copytree(data_dir / "train", root / "csv"))
    rows = [f"{p.relative_to(images).as_posix()},{p.parent.name}" for p in sorted(images.glob("*/*.png"))]
    rows.append("class00/lost.png,class00")
    (images / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return images, ["data.dataset=csv", "data.split_val=null"], [
        "1 of 73 listed images are missing", str(images / "class00" / "lost.png"), f"relative to {images}"
    ]


def _empty_class(root: Path, data_dir: Path) -> tuple[Path, list[str], list[str]]:
    shutil.copytree(data_dir, root / "data")
    for image in (root / "data" / "train" / "class05").iterdir():
        image.unlink()
    return root / "data", [], [str(root / "data" / "train" / "class05"), "has no images"]


@pytest.mark.parametrize(
    "make_data", [_missing_data_dir, _split_file_names_missing_images, _empty_class],
    ids=["missing-data-dir", "split-file-names-missing-images", "empty-class"],
)
def test_bad_data_is_reported_before_the_run_dir_is_created(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path,
    make_data: Callable[[Path, Path], tuple[Path, list[str], list[str]]],
) -> None:
    data, overrides, fragments = make_data(tmp_path, data_dir)
    run = tmp_path / "run"
    error_line(launcher.run("train", config, "--run-dir", run, "--data-dir", data, *overrides), 2, *fragments)
    assert not run.exists()


def test_undecodable_image_in_a_loader_worker(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path, reference: Path
) -> None:
    """Truncated PNGs (every image of one class, so the first batches meet one) read by a DataLoader worker."""
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    broken = sorted((data / "train" / "class03").iterdir())
    for image in broken:
        image.write_bytes(image.read_bytes()[:60])
    run = tmp_path / "run"
    args = ("train", config, "--run-dir", run, "--data-dir", data, "data.num_workers=1")
    line = error_line(launcher.run(*args), 2, "cannot decode image", "data.skip_bad_images=true", only_line=False)
    assert any(str(image) in line for image in broken), line
    assert results_in(run) == []
    # once the images are fixed, the same command works in the same directory
    for image in broken:
        shutil.copyfile(data_dir / "train" / "class03" / image.name, image)
    result = launcher.run(*args)
    assert result.returncode == 0, result.stderr
    assert train_losses(run) == train_losses(reference)  # the worker count does not change the run


# ---------------------------------------------------------------------------------------------------------------------
# Crashes and interruptions


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path, reference: Path
) -> None:
    run, previous = tmp_path / "run", tmp_path / "last-before-the-kill.pt"
    killed = launcher.run(
        "train", config, "--run-dir", run, "--data-dir", data_dir,
        faults={"kill_on_save": ["last.pt", 2, str(previous)]},  # half of epoch 2's last.pt is on disk
    )
    assert killed.returncode == -9, killed.stderr
    checkpoints = run / "checkpoints"
    assert (checkpoints / "last.pt").read_bytes() == previous.read_bytes()
    state = load_checkpoint(checkpoints / "last.pt")
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".last.pt.")]
    assert len(partial) == 1 and partial[0].suffix == ".tmp" and partial[0].stat().st_size > 0
    assert not (run / "summary.json").exists()

    resumed = launcher.run("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert not partial[0].exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]
    assert train_losses(run) == train_losses(reference)
    assert json.loads((run / "summary.json").read_text())["steps"] == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_matches(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path, reference: Path, signal_name: str
) -> None:
    """Ctrl-C (SIGINT to the process group, loader worker included) or SIGTERM to the process group (Slurm,
    ``timeout``) in the middle of epoch 2."""
    run, pause = tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    child = launcher.start(
        "train", config, "--run-dir", run, "--data-dir", data_dir, "data.num_workers=1",
        faults={"pause_at_step": [6, str(pause)]},
    )
    wait_for(pause / "paused")
    child.ctrl_c() if signal_name == "SIGINT" else child.terminate()
    (pause / "go").touch()
    result = child.wait()
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"recallk: interrupted at step 6; resume with: recallk train --resume {run}"
    assert [line for line in lines if line.startswith("recallk:")] == lines[-1:]
    assert sum("stopping after the current step" in line for line in lines) == 1  # not once more per worker
    log = (run / "train.log").read_text().splitlines()  # the console's lines, the one that ends the run included
    assert log[-1].endswith(" WARNING interrupted at step 6; resume with: recallk train --resume " + str(run))
    assert any("stopping after the current step" in line for line in log)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 6)
    assert not (run / "summary.json").exists()

    resumed = launcher.run("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(run) == train_losses(reference)
    final = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for key, value in load_checkpoint(reference / "checkpoints" / "last.pt")["model"].items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)


def logged_steps(run: Path) -> list[tuple[int, str]]:
    """``(step, loss)`` of each per-step line of ``train.log`` (``epoch E step S: loss L (...)``)."""
    steps = []
    for line in (run / "train.log").read_text().splitlines():
        if ": loss " in line and " step " in line:
            step, loss = line.split(" step ", 1)[1].split(": loss ")
            steps.append((int(step), loss.split()[0]))
    return steps


def test_a_run_killed_after_its_checkpoint_resumes_from_another_folder_with_one_record_per_step(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path, reference: Path
) -> None:
    """Started with relative paths in one folder, killed (SIGKILL) one step after its last checkpoint, resumed by
    absolute path from another folder: the steps redone since the checkpoint appear once in train.log, metrics.csv,
    TensorBoard and MLflow, and a resume that fails first writes nothing."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    started_in, resumed_in, pause = tmp_path / "a", tmp_path / "b", tmp_path / "pause"
    for folder in (started_in, resumed_in, pause):
        folder.mkdir()
    child = launcher.start(
        "train", config, "--run-dir", "run", "--data-dir", os.path.relpath(data_dir, started_in), "train.mlflow=true",
        "train.tensorboard=true", "train.log_every=1", faults={"pause_at_step": [6, str(pause)]}, cwd=started_in,
    )  # relative run folder, data folder and MLflow store (output.runs_root: runs)
    wait_for(pause / "paused")  # steps 1-5 done and logged; last.pt is that of step 4 (end of epoch 1)
    child.kill()
    assert child.wait().returncode == -9
    run = started_in / "run"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == STEPS_PER_EPOCH
    assert [step for step, _ in logged_steps(run)] == [1, 2, 3, 4, 5]

    before = files_and_times(run)
    failed = launcher.run("train", "--resume", run, "train.mlflow_uri=sqlite:///other.db", cwd=resumed_in)
    error_line(failed, 2, "is not in train.mlflow_uri=sqlite:///" + str(resumed_in / "other.db"), only_line=False)
    assert files_and_times(run) == before and list(resumed_in.iterdir()) == []

    resumed = launcher.run("train", "--resume", run, cwd=resumed_in)
    assert resumed.returncode == 0, resumed.stderr
    assert list(resumed_in.iterdir()) == [] and not (run / "config_changes.jsonl").exists()
    assert train_losses(run) == train_losses(reference)
    steps = logged_steps(run)
    assert [step for step, _ in steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    losses = [float(loss) for _, loss in steps]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [step for step, _ in steps]
    assert [e.value for e in scalars] == pytest.approx(losses, abs=6e-5)
    assert [e.step for e in events.Scalars("epoch/train_loss")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]

    store = yaml.safe_load((run / "config.yaml").read_text())["train"]["mlflow_uri"]
    assert store == f"sqlite:///{started_in / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    run_id = load_checkpoint(run / "checkpoints" / "last.pt")["trackers"]["mlflow"]
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in history] == [step for step, _ in steps]
    assert [m.value for m in history] == pytest.approx(losses, abs=6e-5)
    per_epoch = [float(np.nanmean([m.value for m in history][i: i + STEPS_PER_EPOCH])) for i in (0, STEPS_PER_EPOCH)]
    assert per_epoch == [float(loss) for loss in train_losses(reference)]  # the same steps, bit for bit
    assert [m.step for m in client.get_metric_history(run_id, "epoch/train_loss")] == [4, 8]


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path, reference: Path
) -> None:
    run = tmp_path / "run"
    result = launcher.run("train", config, "--run-dir", run, "--data-dir", data_dir, faults={"nan_at_step": 6})
    error_line(result, 1, "TrainingDiverged", "the loss became nan at step 6 (epoch 2)", "train.nan_policy=skip",
               only_line=False)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert not (run / "summary.json").exists()
    # the kept checkpoint is good: the run continues from it as if nothing had happened
    resumed = launcher.run("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(run) == train_losses(reference)


def test_a_real_divergence_is_caught(tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path) -> None:
    """lr=1e30: the first update blows the weights up to infinity, the next embeddings are NaN."""
    run = tmp_path / "run"
    result = launcher.run("train", config, "--run-dir", run, "--data-dir", data_dir, "optim.lr=1e30")
    error_line(result, 1, "TrainingDiverged", "the loss became nan at step 2 (epoch 1)", only_line=False)
    assert results_in(run) == []


def test_nan_policy_skip_skips_and_counts_the_step(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path
) -> None:
    run = tmp_path / "run"
    result = launcher.run(
        "train", config, "--run-dir", run, "--data-dir", data_dir, "train.nan_policy=skip", "train.epochs=1",
        faults={"nan_at_step": 2},
    )
    assert result.returncode == 0, result.stderr
    assert "skipped step 2: the loss is nan" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["skipped_steps"], summary["steps"]) == (1, STEPS_PER_EPOCH)
    assert all(torch.isfinite(t).all() for t in load_checkpoint(run / "checkpoints" / "last.pt")["model"].values())


# ---------------------------------------------------------------------------------------------------------------------
# Untrusted checkpoint files


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: what a malicious checkpoint would do with ``os.system``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def _foreign_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(2, 2)}, "epoch": 3}, path)


def _random_bytes(path: Path, marker: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _code_running_pickle(path: Path, marker: Path) -> None:
    torch.save({"format": FORMAT, "model": {}, "payload": _CreatesFile(marker)}, path)


def test_the_code_running_pickle_is_live(tmp_path: Path) -> None:
    """The crafted file really runs code when loaded without ``weights_only`` (so refusing it means something)."""
    marker = tmp_path / "pwned"
    _code_running_pickle(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)["payload"].close()
    assert marker.exists()


@pytest.mark.parametrize(
    ("make_file", "fragment"),
    [
        (_foreign_checkpoint, "is not a recallk checkpoint"),
        (_random_bytes, "is not a safe recallk checkpoint"),
        (_code_running_pickle, "is not a safe recallk checkpoint"),
    ],
    ids=["foreign-dict", "random-bytes", "code-running-pickle"],
)
def test_untrusted_checkpoints_are_refused(
    tmp_path: Path, launcher: Launcher, reference: Path, make_file: Callable[[Path, Path], None], fragment: str
) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pt"
    make_file(checkpoint, marker)
    error_line(launcher.run("evaluate", checkpoint), 2, str(checkpoint), fragment)
    assert not marker.exists()

    run = copy_run(reference, tmp_path)
    shutil.copyfile(checkpoint, run / "checkpoints" / "last.pt")
    before = files_and_times(run)
    error_line(launcher.run("train", "--resume", run), 2, str(run / "checkpoints" / "last.pt"), fragment)
    assert not marker.exists()
    assert files_and_times(run) == before


# ---------------------------------------------------------------------------------------------------------------------
# Full disk and a busy run directory


@pytest.mark.parametrize("limit", [6_000, 20_000], ids=["6kB", "20kB"])
def test_full_disk_keeps_the_earlier_outputs(tmp_path: Path, launcher: Launcher, reference: Path, limit: int) -> None:
    """Files may not grow past ``limit`` bytes (a checkpoint has ~50 kB) while a finished run gets one more epoch.

    torch.save reports a failed write as a vague RuntimeError when the limit is hit while its first 8 kB buffer is
    flushed (6 kB), as an OSError later (20 kB): both must give the same clear message.
    """
    run = copy_run(reference, tmp_path)
    last = (run / "checkpoints" / "last.pt").read_bytes()
    summary = (run / "summary.json").read_bytes()
    assert len(last) > limit
    result = launcher.run("train", "--resume", run, f"train.epochs={EPOCHS + 1}", faults={"file_size_limit": limit})
    line = error_line(result, 2, "could not write", "File too large", "free disk space", only_line=False)
    assert str(run / "checkpoints") in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == last
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == EPOCHS * STEPS_PER_EPOCH
    assert (run / "summary.json").read_bytes() == summary
    assert [p.name for p in run.rglob(".*.tmp")] == []


def test_a_finished_run_is_not_overwritten(launcher: Launcher, config: Path, data_dir: Path, reference: Path) -> None:
    before = files_and_times(reference)
    result = launcher.run("train", config, "--run-dir", reference, "--data-dir", data_dir)
    error_line(result, 2, f"run directory {reference} already holds a run", f"--resume {reference}")
    assert files_and_times(reference) == before


def test_a_second_process_is_refused_while_the_first_runs(
    tmp_path: Path, launcher: Launcher, config: Path, data_dir: Path, reference: Path
) -> None:
    run, pause = tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    first = launcher.start(
        "train", config, "--run-dir", run, "--data-dir", data_dir, faults={"pause_at_step": [6, str(pause)]}
    )
    wait_for(pause / "paused")  # epoch 1 is saved; the first process holds the directory
    error_line(launcher.run("train", "--resume", run), 2, f"run directory {run} is in use by another recallk process")
    error_line(
        launcher.run("train", config, "--run-dir", run, "--data-dir", data_dir), 2, f"{run} already holds a run"
    )
    (pause / "go").touch()
    result = first.wait()
    assert result.returncode == 0, result.stderr
    assert train_losses(run) == train_losses(reference)
