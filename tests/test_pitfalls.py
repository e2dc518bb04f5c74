"""What a new user meets on their own data and default settings (issue #11): each case trains or evaluates for real
and checks that the number reported is right, that a silent failure now says so, or that a promise holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from recallk.evaluation.evaluate import evaluate_run
from recallk.training.trainer import train
from test_trainer import make_glyph_folder, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))


def test_bf16_training_reports_the_float32_metrics_of_recallk_evaluate(tmp_path: Path, data_dir: Path) -> None:
    """Under train.amp=bf16 the summary's test metrics are those `recallk evaluate` computes on the checkpoint."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, train__amp="bf16", train__epochs=2, output__plots=False)
    summary = train(config, run, data_dir=data_dir, progress=False)
    evaluated = evaluate_run(run, data_dir=data_dir, device="cpu", progress=False)["test"]
    for metric in ("recall@1", "recall@2", "map@r"):
        assert abs(summary[metric] - evaluated[metric]) <= 1e-3, (metric, summary[metric], evaluated[metric])
