"""The demo pipeline on the real Omniglot zips (a few training steps; the full demo is `make demo`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recallk.demo import SUMMARY_KEYS, run_demo

SHARED = Path(os.environ.get("RECALLK_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.skipif(not (SHARED / "omniglot" / "images_evaluation.zip").is_file(), reason="no Omniglot data")
def test_demo_runs_end_to_end_on_real_omniglot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "demo"
    summary = run_demo(SHARED, run, device="cpu", overrides=["train.max_steps=2", "train.epochs=2"], progress=False)
    written = json.loads((run / "summary.json").read_text())
    assert set(SUMMARY_KEYS) | {"seconds", "raw_pixels"} <= set(written)
    assert written["raw_pixels"]["num_queries"] == 659 * 20
    assert written["splits"]["test"]["num_queries"] == 659 * 20
    assert 0.2 < written["raw_pixels"]["recall@1"] < 0.5  # raw pixels are a weak but real baseline
    assert summary["recall@1"] == written["recall@1"]
    assert (run / "plots" / "recall_at_k.png").is_file() and (run / "plots" / "retrievals_test.png").is_file()
    out = capsys.readouterr().out
    assert "raw pixels" in out and "after training" in out
    # a second demo moves the finished one aside instead of refusing or overwriting it
    run_demo(SHARED, run, device="cpu", overrides=["train.max_steps=1", "train.epochs=2"], progress=False)
    assert (tmp_path / "demo.previous" / "summary.json").is_file()


@pytest.mark.skipif(not (SHARED / "omniglot" / "images_evaluation.zip").is_file(), reason="no Omniglot data")
def test_in_memory_omniglot_matches_the_file_reader() -> None:
    """The decoded arrays line up with the file reader: same labels, same item ids, same (inverted) pixels."""
    import numpy as np

    from recallk.config import DataConfig
    from recallk.data.factory import build_dataset
    from recallk.data.sources import build_source

    cfg = DataConfig(dataset="omniglot", in_memory=True, image_size=28, val_classes=100)
    arrays = build_source(cfg, "val", False, SHARED)
    files = build_dataset("omniglot", SHARED, "val", val_classes=100)
    assert arrays.item_ids == files.item_ids
    assert np.array_equal(arrays.labels.numpy(), files.labels)
    for index in (0, 777, len(files) - 1):
        image = np.asarray(files.load_image(index).resize((28, 28)), dtype=np.float64)
        assert np.abs(arrays.images[index, 0].double().numpy() - image).mean() < 8  # resampling differs slightly
