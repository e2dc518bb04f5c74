"""End-to-end training on a tiny real image folder: outputs, exact resume, NaN handling, run-dir safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recallk.errors import RecallkUsageError
from recallk.files import read_metrics
from recallk.training.checkpoint import load_checkpoint
from recallk.training.trainer import Trainer, TrainingDiverged, train

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))


def test_training_writes_every_output(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    summary = train(tiny_config(tmp_path), run, data_dir=data_dir, progress=False)
    assert {"recall@1", "recall@2", "map@r", "splits", "best_epoch"} <= set(summary)
    assert json.loads((run / "summary.json").read_text())["recall@1"] == summary["recall@1"]
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all("val_recall@1" in r for r in rows)
    for name in ("training_curves.png", "recall_at_k.png", "retrievals_test.png"):
        assert (run / "plots" / name).stat().st_size > 1000
    exported = np.load(run / "embeddings_test.npz")
    assert exported["embeddings"].shape == (72, 16) and len(exported["item_ids"]) == 72
    np.testing.assert_allclose(np.linalg.norm(exported["embeddings"], axis=1), 1.0, rtol=1e-5)
    assert (run / "config.yaml").is_file()
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best"]["epoch"] == summary["best_epoch"]


def test_training_improves_over_initialisation(tmp_path: Path, data_dir: Path) -> None:
    """Retrieval on the training classes must improve: the loop really optimises the model."""
    seen = {"data__split_val": None, "data__split_test": ["train"], "output__plots": False}
    before = train(tiny_config(tmp_path, train__epochs=1, optim__lr=1e-9, **seen), tmp_path / "a",
                   data_dir=data_dir, progress=False)
    after = train(tiny_config(tmp_path, train__epochs=8, **seen), tmp_path / "b", data_dir=data_dir, progress=False)
    assert after["map@r"] > before["map@r"] + 0.05


def test_chunked_and_plain_steps_agree(tmp_path: Path, data_dir: Path) -> None:
    """The multistage engine (chunks of 6) and a plain backward (one chunk) train the same model."""
    chunked = train(tiny_config(tmp_path, train__epochs=1), tmp_path / "c", data_dir=data_dir, progress=False)
    plain = train(tiny_config(tmp_path, train__epochs=1, train__chunk_size=16), tmp_path / "p", data_dir=data_dir,
                  progress=False)
    a = load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "p" / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert chunked["recall@1"] == pytest.approx(plain["recall@1"], abs=0.02)


def test_resume_mid_epoch_repeats_the_uninterrupted_run(tmp_path: Path, data_dir: Path) -> None:
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(tiny_config(tmp_path), full_dir, data_dir=data_dir, progress=False)
    # stop in the middle of epoch 2 (4 batches per epoch), then resume to the end
    train(tiny_config(tmp_path, train__max_steps=6), cut_dir, data_dir=data_dir, progress=False)
    state = load_checkpoint(cut_dir / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 6)
    with open(cut_dir / "steps.csv", "a") as steps:  # step 7 of a process killed before its next checkpoint
        steps.write("7,1.75,0.5,0.001\n")
    trainer = Trainer(tiny_config(tmp_path), cut_dir, resume=True, data_dir=data_dir, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    full, cut = read_metrics(full_dir / "metrics.csv"), read_metrics(cut_dir / "metrics.csv")
    # the stop at step 6 validated the half-trained epoch 2 (its own row); the resumed run then continued exactly
    assert [r["epoch"] for r in cut] == ["1", "1.5", "2", "3"] and cut[1]["val_recall@1"]
    assert [r["train_loss"] for r in cut if r["epoch"] != "1.5"] == [r["train_loss"] for r in full]
    assert read_metrics(cut_dir / "steps.csv") == read_metrics(full_dir / "steps.csv")  # each step once, the same
    a = load_checkpoint(full_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cut_dir / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "nan"
    train(tiny_config(tmp_path, train__epochs=1), run, data_dir=data_dir, progress=False)
    good = (run / "checkpoints" / "last.pt").read_bytes()
    trainer = Trainer(tiny_config(tmp_path, train__epochs=2), run, resume=True, data_dir=data_dir, progress=False)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"at step 5 \(epoch 2\)"):
        trainer.fit()
    trainer.close()
    assert (run / "checkpoints" / "last.pt").read_bytes() == good


def test_nan_policy_skip_counts_skipped_steps(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path, train__epochs=1, train__nan_policy="skip")
    trainer = Trainer(cfg, tmp_path / "skip", data_dir=data_dir, progress=False)
    real_forward, calls = trainer.loss_fn.forward, []

    def second_step_diverges(embeddings, labels, **kwargs):  # fault injection into the real loss
        calls.append(1)
        loss = real_forward(embeddings, labels, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.loss_fn.forward = second_step_diverges
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_existing_run_directory_is_refused(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "taken"
    train(tiny_config(tmp_path, train__epochs=1), run, data_dir=data_dir, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RecallkUsageError, match="already holds a run"):
        train(tiny_config(tmp_path, train__epochs=1), run, data_dir=data_dir, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_second_process_on_the_same_run_directory_is_refused(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "busy"
    first = Trainer(tiny_config(tmp_path, train__epochs=1), run, data_dir=data_dir, progress=False)
    try:
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"")
        with pytest.raises(RecallkUsageError, match="in use by another recallk process"):
            Trainer(tiny_config(tmp_path, train__epochs=1), run, resume=True, data_dir=data_dir, progress=False)
    finally:
        first.close()


def test_chunking_needs_frozen_batchnorm(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(RecallkUsageError, match="freeze_batchnorm"):
        Trainer(tiny_config(tmp_path, model__freeze_batchnorm=False), tmp_path / "bn", data_dir=data_dir,
                progress=False)


def test_tensorboard_events_are_written(tmp_path: Path, data_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(tiny_config(tmp_path, train__epochs=1, train__tensorboard=True, output__plots=False), run,
          data_dir=data_dir, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 4
    assert events.Scalars("epoch/val_recall@1")[0].step == 4  # every tracker's x axis is the optimiser step


def test_resume_applies_a_new_learning_rate(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "lr"
    train(tiny_config(tmp_path, train__epochs=1, optim__schedule="none"), run, data_dir=data_dir, progress=False)
    same = Trainer(tiny_config(tmp_path, train__epochs=2, optim__schedule="none"), run, resume=True,
                   data_dir=data_dir, progress=False)
    assert [g["lr"] for g in same.optimizer.param_groups] == pytest.approx([3e-3] * len(same.optimizer.param_groups))
    same.close()
    new = Trainer(tiny_config(tmp_path, train__epochs=2, optim__schedule="none", optim__lr=1e-5), run, resume=True,
                  data_dir=data_dir, progress=False)
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([1e-5] * len(new.optimizer.param_groups))
    new.close()


def test_proxies_train_at_their_own_learning_rate(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path, loss__name="proxy_anchor", optim__loss_lr_mult=100.0, optim__schedule="none")
    trainer = Trainer(cfg, tmp_path / "proxy", data_dir=data_dir, progress=False)
    try:
        rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert rates == pytest.approx({"backbone": 3e-3, "head": 3e-3, "loss": 0.3})
        proxies = trainer.loss_fn.proxies.detach().clone()
        trainer.cfg.train.max_steps = 1
        trainer.fit()
        # Adam moves every coordinate by about lr in its first step
        assert float((trainer.loss_fn.proxies - proxies).abs().max()) == pytest.approx(0.3, rel=0.05)
    finally:
        trainer.close()


def test_a_typo_in_the_test_split_fails_before_training(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        Trainer(tiny_config(tmp_path, data__split_test=["nope"]), tmp_path / "typo", data_dir=data_dir, progress=False)
    assert not (tmp_path / "typo").exists()


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from recallk.training.tracking import TensorBoardTracker

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail, as when not installed
    with pytest.raises(RecallkUsageError, match=r"pip install 'recallk\[tensorboard\]'"):
        TensorBoardTracker(tmp_path / "tb")


def test_resuming_a_finished_run_says_how_to_extend_it(tmp_path: Path, data_dir: Path) -> None:
    """It used to log "resumed ... in epoch 2/1" and evaluate again; now one line names the key to raise."""
    run = tmp_path / "done"
    train(tiny_config(tmp_path, train__epochs=1, output__plots=False), run, data_dir=data_dir, progress=False)
    with pytest.raises(RecallkUsageError, match=r"has finished: it trained all train.epochs=1 epochs; .*"
                                                r"train.epochs=2\).*'recallk evaluate "):
        Trainer(tiny_config(tmp_path, train__epochs=1), run, resume=True, data_dir=data_dir, progress=False)
    cut = tmp_path / "cut"
    train(tiny_config(tmp_path, train__epochs=2, train__max_steps=2, output__plots=False), cut, data_dir=data_dir,
          progress=False)
    with pytest.raises(RecallkUsageError, match="stopped at train.max_steps=2; .* train.max_steps=null"):
        Trainer(tiny_config(tmp_path, train__epochs=2, train__max_steps=2), cut, resume=True, data_dir=data_dir,
                progress=False)
    Trainer(tiny_config(tmp_path, train__epochs=2), cut, resume=True, data_dir=data_dir, progress=False).close()
