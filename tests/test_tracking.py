"""Experiment tracking: one tiny training logged to MLflow's default store and an offline Weights & Biases run,
read back with MLflow's own client in another process and from the W&B run file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recallk.cli import main
from recallk.config import config_to_yaml
from recallk.training.trainer import Trainer, train

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config

# What a user types to look at a run (README): MlflowClient on the store named in the run's config.yaml.
READ_RUN = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
(run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
history = lambda key: [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, key)]
print(json.dumps({"name": run.info.run_name, "status": run.info.status, "params": run.data.params,
                  "tags": run.data.tags, "metrics": run.data.metrics, "loss": history("train/loss"),
                  "test": history("test/test/recall_at_1")}))
"""


def read_mlflow_run(uri: str, cwd: Path) -> dict:
    """The run of experiment ``tiny`` in the store ``uri``, read by a new Python process in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", READ_RUN, uri], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-log
    records (crc32, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, records, payload = path.read_bytes(), [], b""
    assert data[:4] == b":W&B"
    pos, block = 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        payload += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
        elif kind == 0:
            break
    return records


def _items(items: object) -> dict:
    """``{key: value}`` of W&B history, summary or config items (the key is ``key`` or the one ``nested_key``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_mlflow_and_wandb_get_params_metrics_and_the_test_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(Path("runs"), train__epochs=1, train__max_steps=2, train__mlflow=True, train__wandb=True,
                      output__plots=False, output__export_embeddings=False)  # the default store, a relative root
    run_dir = tmp_path / "run"
    data_dir = make_glyph_folder(tmp_path / "glyphs")
    summary = train(cfg, run_dir, data_dir=data_dir, progress=False)

    # the store is fixed, absolute, in the run's config; another process in another folder reads it as it is
    store = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["mlflow_uri"]
    assert store == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = read_mlflow_run(store, elsewhere)
    assert run["name"] == "run" and run["status"] == "FINISHED"
    assert run["params"]["optim.lr"] == "0.003" and run["params"]["data.batch_size"] == "16"
    assert [step for step, _ in run["loss"]] == [1, 2]
    assert 0 < run["metrics"]["epoch/val_recall_at_1"] <= 1
    assert run["metrics"]["test/test/recall_at_1"] == pytest.approx(summary["recall@1"])
    assert list(elsewhere.iterdir()) == []

    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary_items, config_items = [], {}, {}
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary_items.update(_items(record.summary.update))
        elif kind == "config":
            config_items.update(_items(record.config.update))
        elif kind == "run":
            config_items.update(_items(record.run.config.update))
    assert [row["_step"] for row in history if "train/loss" in row] == [1, 2]
    assert any("epoch/val_recall@1" in row for row in history)
    assert summary_items["test/test/recall@1"] == pytest.approx(summary["recall@1"])
    assert config_items["optim.lr"] == 0.003

    # a resumed training continues the same MLflow run (its id is in the checkpoint)
    resumed = tiny_config(Path("runs"), train__epochs=1, train__max_steps=3, train__mlflow=True, train__wandb=False,
                          output__plots=False, output__export_embeddings=False)
    trainer = Trainer(resumed, run_dir, resume=True, data_dir=data_dir, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    again = read_mlflow_run(store, elsewhere)
    assert again["status"] == "FINISHED"
    assert [step for step, _ in again["loss"]] == [1, 2, 3] and again["loss"][:2] == run["loss"]
    # the test table sits at the last step (not at step 0); the changed key's current value is a tag (params are
    # immutable in MLflow: the param keeps the starting value)
    assert [step for step, _ in again["test"]] == [2, 3]
    assert again["params"]["train.max_steps"] == "2" and again["tags"]["train.max_steps"] == "3 (from step 2)"


def test_an_mlflow_store_that_cannot_be_opened_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config(tmp_path / "runs", train__epochs=1, train__max_steps=1)),
                      encoding="utf-8")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    uri = f"sqlite:///{blocker}/mlflow.db"  # its folder is a file
    status = main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--data-dir",
                   str(make_glyph_folder(tmp_path / "glyphs")), "train.mlflow=true", f"train.mlflow_uri={uri}"])
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recallk:")]
    assert len(lines) == 1, lines
    assert f"cannot open the MLflow store train.mlflow_uri={uri}" in lines[0] and "train.mlflow=false" in lines[0]
