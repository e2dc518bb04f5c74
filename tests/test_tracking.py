"""Experiment tracking: one tiny training logged to a real MLflow file store and an offline Weights & Biases run,
read back with MLflow's own client and from the W&B run file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from recallk.training.trainer import Trainer, train

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config


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
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    cfg = tiny_config(tmp_path, train__epochs=1, train__max_steps=2, train__mlflow=True, train__mlflow_uri=store,
                      train__wandb=True, output__plots=False, output__export_embeddings=False)
    run_dir = tmp_path / "run"
    data_dir = make_glyph_folder(tmp_path / "glyphs")
    summary = train(cfg, run_dir, data_dir=data_dir, progress=False)

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["data.batch_size"] == "16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert 0 < run.data.metrics["epoch/val_recall_at_1"] <= 1
    assert run.data.metrics["test/test/recall_at_1"] == pytest.approx(summary["recall@1"])

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
    resumed = tiny_config(tmp_path, train__epochs=1, train__max_steps=3, train__mlflow=True, train__mlflow_uri=store,
                          train__wandb=False, output__plots=False, output__export_embeddings=False)
    trainer = Trainer(resumed, run_dir, resume=True, data_dir=data_dir, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    (again,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    # the test table sits at the last step (not at step 0); the changed key's current value is a tag (params are
    # immutable in MLflow: the param keeps the starting value)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/test/recall_at_1")] == [2, 3]
    assert again.data.params["train.max_steps"] == "2" and again.data.tags["train.max_steps"] == "3 (from step 2)"
