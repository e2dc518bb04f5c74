"""benchmarks/omniglot_validation.py: its rank correlation and report (the training run itself is the benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "omniglot_validation.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("omniglot_validation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_matches_the_rank_formula_with_ties(bench: ModuleType) -> None:
    a, b = [0.1, 0.4, 0.4, 0.9, 0.2], [3.0, 1.0, 2.0, 5.0, 4.0]

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values))
        for value in set(values):  # ties share their average rank
            out[np.asarray(values) == value] = out[np.asarray(values) == value].mean()
        return out

    expected = np.corrcoef(ranks(a), ranks(b))[0, 1]
    assert bench._spearman(a, b) == pytest.approx(expected)
    assert bench._spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert bench._spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_report_picks_epochs_and_correlates(tmp_path: Path, bench: ModuleType) -> None:
    test_r1 = [0.5, 0.7, 0.8, 0.82, 0.81, 0.85]
    rows = [
        {"epoch": e + 1, "val_classes": 200,
         "val": {"recall@1": t + 0.05, "map@r": t / 2, "images": 4000},
         "val30": {"recall@1": 0.99, "map@r": 0.9, "images": 600},
         "test": {"recall@1": t, "map@r": t / 2 - 0.1, "images": 13180}}
        for e, t in enumerate(test_r1)
    ]
    (tmp_path / "omniglot_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = bench.report(tmp_path)
    assert "val (200 classes, 4000 images)" in text
    line = next(x for x in text.splitlines() if x.startswith("| val | recall@1 |"))
    assert line.split(" | ")[2:6] == ["1.000", "1.000", "6", "0.8500"]
    flat = next(x for x in text.splitlines() if x.startswith("| val30 | recall@1 |"))
    assert flat.split(" | ")[2] == "nan" and flat.split(" | ")[4] == "1"  # a saturated split cannot choose
