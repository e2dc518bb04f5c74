"""A run's paths are made absolute when it starts (recallk.training.run_paths), and a shared model keeps none."""

from __future__ import annotations

from pathlib import Path

import pytest

from recallk.config import config_to_yaml
from recallk.pretrained import shareable_config
from recallk.training.run_paths import with_absolute_paths
from recallk.training.tracking import mlflow_store_uri

from run_fixtures import tiny_config


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (None, "sqlite:///{cwd}/runs/mlflow.db"),  # the default: SQLite under output.runs_root
        ("sqlite:///store/m.db", "sqlite:///{cwd}/store/m.db"),
        ("sqlite:///~/m.db?timeout=30", "sqlite:///" + str(Path.home()) + "/m.db?timeout=30"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("file:store/mlruns", "file://{cwd}/store/mlruns"),
        ("store/mlruns", "file://{cwd}/store/mlruns"),
        ("http://tracking:5000", "http://tracking:5000"),
        ("postgresql://user@db/mlflow", "postgresql://user@db/mlflow"),
    ],
)
def test_mlflow_store_uri_is_absolute(
    uri: str | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(Path("runs"), train__mlflow=True, train__mlflow_uri=uri)
    assert mlflow_store_uri(config) == expected.format(cwd=tmp_path)


def test_mlflow_tracking_uri_variable_is_fixed_into_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    config = with_absolute_paths(tiny_config(Path("runs"), train__mlflow=True), "run")
    assert config.train.mlflow_uri == f"sqlite:///{tmp_path / 'team.db'}"


def test_every_path_of_a_run_is_absolute_and_a_shared_model_keeps_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(Path("runs"), train__mlflow=True, model__pretrained_path="weights/../w.pth")
    fixed = with_absolute_paths(config, "runs/../run", data_dir="data")
    assert (fixed.data.data_dir, fixed.model.pretrained_path) == (str(tmp_path / "data"), str(tmp_path / "w.pth"))
    assert (fixed.output.runs_root, fixed.output.run_dir) == (str(tmp_path / "runs"), str(tmp_path / "run"))
    assert fixed.train.mlflow_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert config.data.data_dir is None and config.output.run_dir is None  # the caller's config is left as it was
    assert with_absolute_paths(fixed, fixed.output.run_dir) == fixed  # resuming from elsewhere changes nothing
    assert str(tmp_path) not in config_to_yaml(shareable_config(fixed))


def test_null_data_dir_is_the_folder_it_resolves_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECALLK_DATA", "shared/data")
    assert with_absolute_paths(tiny_config(tmp_path), "run").data.data_dir == str(tmp_path / "shared" / "data")
    assert with_absolute_paths(tiny_config(tmp_path), "run").model.pretrained_path is None
    packaged = tiny_config(tmp_path, model__pretrained_path="package:mobilenetv2_100")
    assert with_absolute_paths(packaged, "run").model.pretrained_path == "package:mobilenetv2_100"
