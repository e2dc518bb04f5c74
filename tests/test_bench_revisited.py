"""benchmarks/revisited_search.py at a tiny size, in process: it prints its header and one row of numbers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "revisited_search.py"


def test_benchmark_prints_a_row(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("revisited_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags = ["--distractors", "3000", "--dim", "8", "--chunk", "2048", "--header"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *flags])
    module.main()
    header, rule, row = capsys.readouterr().out.strip().splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 10
    assert row.split("|")[2:7] == [" 70 ", " 4993 ", " 3000 ", " 8 ", " 2048 "]
