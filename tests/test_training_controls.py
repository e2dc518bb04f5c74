"""Training controls: a max_steps stop mid-epoch, gradient clipping, EMA weights, early stopping, warm-up in steps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from recallk.config import config_to_yaml, explain_config
from recallk.errors import ConfigError, RecallkUsageError
from recallk.evaluation.embed import embed_source
from recallk.files import read_metrics
from recallk.training.checkpoint import load_checkpoint
from recallk.training.resume_config import check_resume_config
from recallk.training.trainer import Trainer, train

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config

QUICK = {"output__plots": False, "output__export_embeddings": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))


def _fit(trainer: Trainer) -> dict:
    try:
        return trainer.fit()
    finally:
        trainer.close()


def test_max_steps_mid_epoch_validates_and_records_the_partial_epoch(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    summary = train(tiny_config(tmp_path, train__epochs=2, train__max_steps=2, **QUICK), run, data_dir=data_dir,
                    progress=False)
    rows = read_metrics(run / "metrics.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("0.5", "2")]  # 2 of 4 batches of epoch 1
    assert float(rows[0]["train_loss"]) > 0 and rows[0]["val_recall@1"]
    assert (summary["epochs"], summary["steps"], summary["best_epoch"]) == (0.5, 2, 0.5)
    assert summary["stop_reason"] == "max_steps"
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == 0.5
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_clip_grad_norm_bounds_the_gradient_of_each_step(tmp_path: Path, data_dir: Path) -> None:
    norms = {}
    for clip in (None, 1e-3):
        cfg = tiny_config(tmp_path, train__epochs=1, train__max_steps=1, data__split_val=None,
                          optim__clip_grad_norm=clip, **QUICK)
        trainer = Trainer(cfg, tmp_path / f"clip{clip}", data_dir=data_dir, progress=False)
        _fit(trainer)  # the step's gradients stay in .grad until the next step
        grads = [p.grad for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms[clip] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert norms[None] > 1e-2
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_ema_weights_are_evaluated_saved_and_resumed_exactly(tmp_path: Path, data_dir: Path) -> None:
    ema = {"train__ema_decay": 0.5, "train__epochs": 1, "data__split_val": None}
    full = train(tiny_config(tmp_path, **ema, output__plots=False), tmp_path / "full", data_dir=data_dir,
                 progress=False)
    state = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert state["ema_updates"] == 4 and full["weights"].startswith("exponential moving average")
    trained, averaged = state["trained_model"], state["model"]
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)
    # the summary's test embeddings are those of the averaged weights, not of the trained ones
    trainer = Trainer(tiny_config(tmp_path, **ema, **QUICK), tmp_path / "probe", data_dir=data_dir, progress=False)
    trainer.close()
    exported = np.load(tmp_path / "full" / "embeddings_test.npz")["embeddings"]
    for weights, same in ((averaged, True), (trained, False)):
        trainer.model.load_state_dict(weights)
        embeddings = embed_source(trainer.model, trainer.test_sources["test"], 32, torch.device("cpu"),
                                  progress=False).numpy()
        assert np.allclose(embeddings, exported, atol=1e-5) == same
    # stopped after 2 steps and resumed: the same average, bit for bit
    train(tiny_config(tmp_path, **ema, train__max_steps=2, **QUICK), tmp_path / "cut", data_dir=data_dir,
          progress=False)
    _fit(Trainer(tiny_config(tmp_path, **ema, **QUICK), tmp_path / "cut", resume=True, data_dir=data_dir,
                 progress=False))
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed["ema_updates"] == 4
    for key in averaged:
        torch.testing.assert_close(resumed["model"][key], averaged[key], rtol=0, atol=0)


def test_early_stopping_stops_when_validation_stalls(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # lr 1e-9: the model does not change, so validation recall never improves after epoch 1
    cfg = tiny_config(tmp_path, train__epochs=5, optim__lr=1e-9, train__early_stopping_patience=2, **QUICK)
    with caplog.at_level(logging.INFO, logger="recallk"):
        summary = train(cfg, tmp_path / "run", data_dir=data_dir, progress=False)
    assert (summary["stop_reason"], summary["epochs"], summary["best_epoch"]) == ("early_stopping", 3, 1)
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 3
    assert "early stopping after epoch 3" in caplog.text and "not improved for 2 evaluations" in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("epoch 3/5", "early stopping"))]
    assert [line.split()[0] for line in lines] == ["epoch", "early"]  # that epoch's line first, then why it stops
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 3


def test_warmup_steps_ramp_the_learning_rate_linearly(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path, optim__warmup_steps=4, optim__schedule="none", **QUICK)
    trainer = Trainer(cfg, tmp_path / "run", data_dir=data_dir, progress=False)
    trainer.close()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 / 4)  # the first step's rate
    rates = [3e-3 * trainer.scheduler.lr_lambdas[0](step) for step in range(6)]
    assert rates == pytest.approx([3e-3 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])


def test_the_controls_are_validated_explained_and_checked_on_resume(tmp_path: Path) -> None:
    for bad, match in (
        ({"train__ema_decay": 1.0}, "train.ema_decay"),
        ({"optim__clip_grad_norm": 0.0}, "optim.clip_grad_norm"),
        ({"optim__warmup_steps": 10, "optim__warmup_epochs": 1}, "optim.warmup_steps"),
        ({"train__early_stopping_patience": 2, "data__split_val": None}, "data.split_val"),
    ):
        with pytest.raises(ConfigError, match=match):
            tiny_config(tmp_path, **bad)
    text = explain_config()
    for key in ("optim.clip_grad_norm", "optim.warmup_steps", "train.ema_decay", "train.early_stopping_patience",
                "train.mlflow", "train.wandb"):
        assert key in text
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(tiny_config(tmp_path)))
    assert check_resume_config(run, tiny_config(tmp_path, optim__clip_grad_norm=1.0, train__early_stopping_patience=3))
    with pytest.raises(RecallkUsageError, match="train.ema_decay"):  # the average's state is not in the checkpoint
        check_resume_config(run, tiny_config(tmp_path, train__ema_decay=0.9))


def test_ema_keeps_batchnorm_counts_instead_of_averaging_them(tmp_path: Path, data_dir: Path) -> None:
    """BatchNorm in training mode (whole batches, model.freeze_batchnorm null) counts its batches in the integer
    buffer num_batches_tracked: the average takes the count (torch's EMA function averaged and truncated it)."""
    cfg = tiny_config(tmp_path, train__ema_decay=0.9, train__epochs=1, train__chunk_size=16, data__split_val=None,
                      model__freeze_batchnorm=None, **QUICK)
    train(cfg, tmp_path / "run", data_dir=data_dir, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    counts = {k: v for k, v in state["trained_model"].items() if k.endswith("num_batches_tracked")}
    assert counts and all(int(v) == 4 for v in counts.values())  # 4 steps, one forward pass each
    assert all(torch.equal(state["model"][k], v) for k, v in counts.items())
