"""benchmarks/multistage_memory.py: real subprocess runs at tiny sizes on the CPU (the table's rows and columns,
error rows, invalid options) and its FLOP count against FlopCounterMode over a whole real training step."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from recallk.engine.multistage import multistage_backward
from recallk.losses.recall_at_k import RecallAtKLoss

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "multistage_memory.py"
COLUMNS = ["method", "batch", "chunk", "compile", "peak memory (MiB)", "images/s", "TFLOP/s", "% of peak"]
OMNIGLOT_FLAGS = ["--setting", "omniglot", "--sizes", "16", "--chunk", "8", "--steps", "1"]
SYNTHETIC_FLAGS = ["--sizes", "16", "--chunk", "8", "--steps", "1", "--compile", "off"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("multistage_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def run_script(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def runs(bench: ModuleType) -> dict:
    """The real runs, started together (each measurement still has its own process): both settings, and one
    measurement that fails (multistage with BatchNorm in training mode)."""
    failing_args = argparse.Namespace(setting="omniglot", device="cpu", chunk=8, steps=1, threads=1)
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = {
            "omniglot": pool.submit(run_script, *OMNIGLOT_FLAGS),
            "synthetic": pool.submit(run_script, *SYNTHETIC_FLAGS),
            "failing": pool.submit(bench.run_isolated, bench.Case("multistage", 16, "batch"), failing_args),
        }
        return {name: job.result() for name, job in jobs.items()}


def parse_table(stdout: str) -> tuple[str, list[str], list[list[str]]]:
    """The first line, the header cells and the body rows of the printed markdown table."""
    lines = stdout.strip().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert table[1] == ["---"] * len(table[0])
    return lines[0], table[0], table[2:]


def check_measured(row: list[str]) -> None:
    """Peak memory, images/s and TFLOP/s are positive numbers; no peak is known on the CPU."""
    assert all(float(cell) > 0 for cell in row[4:7]), row
    assert row[7] == "-"


def test_omniglot_table_has_the_recipe_model_rows(runs: dict) -> None:
    result = runs["omniglot"]
    assert result.returncode == 0, result.stderr
    title, header, rows = parse_table(result.stdout)
    assert "omniglot_cnn 32-64-128-256" in title and "command: python benchmarks/multistage_memory.py" in title
    assert " ".join(OMNIGLOT_FLAGS) in title
    assert header == COLUMNS
    assert [row[:4] for row in rows] == [
        ["plain (BatchNorm)", "16", "-", "no"],
        ["plain (GroupNorm)", "16", "-", "no"],
        ["multistage (GroupNorm)", "16", "8", "no"],
    ]
    for row in rows:
        check_measured(row)


def test_synthetic_table_keeps_its_methods_and_adds_the_loss_alone(runs: dict) -> None:
    result = runs["synthetic"]
    assert result.returncode == 0, result.stderr
    title, header, rows = parse_table(result.stdout)
    assert "small CNN (3 conv blocks), 32 px" in title
    assert header == COLUMNS
    assert [row[:4] for row in rows] == [
        ["multistage", "16", "8", "no"], ["plain", "16", "-", "no"], ["RS@k loss alone", "16", "-", "-"],
    ]
    for row in rows:
        check_measured(row)


@pytest.mark.parametrize(("flags", "message"), [
    (["--chunk", "0"], "argument --chunk: must be a positive integer, got '0'"),
    (["--sizes", "16", "x"], "argument --sizes: must be a positive integer, got 'x'"),
    (["--peak-tflops", "-5"], "argument --peak-tflops: must be a positive number, got '-5'"),
    (["--setting", "omniglot", "--device", "cuda"], "--setting omniglot is the CPU demo's training step"),
])  # fmt: skip
def test_an_invalid_option_fails_with_a_clear_message(
    bench: ModuleType, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_arguments(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_depend_on_the_setting(bench: ModuleType) -> None:
    omniglot = bench.parse_arguments(["--setting", "omniglot"])
    assert (omniglot.sizes, omniglot.chunk, omniglot.compile) == ([512, 4096], 256, "off")
    synthetic = bench.parse_arguments([])
    assert (synthetic.sizes, synthetic.chunk, synthetic.compile) == ([256, 4096], 128, "off")


def test_a_failing_measurement_becomes_an_error_row(bench: ModuleType, runs: dict) -> None:
    row = runs["failing"]
    assert "BatchNorm layers in training mode" in row["error"]
    cells = bench.table_row(row, "omniglot", 8, None).strip("|").split("|")
    assert [cell.strip() for cell in cells][:4] == ["multistage (BatchNorm)", "16", "8", "no"]
    assert "BatchNorm layers in training mode" in cells[4] and [c.strip() for c in cells[5:]] == ["-", "-", "-"]


def test_known_gpus_have_a_bf16_peak(bench: ModuleType) -> None:
    assert bench.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.device_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench.device_peak_tflops("NVIDIA H200") == 989
    assert bench.device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench.device_peak_tflops("NVIDIA GeForce RTX 4090") is None


@pytest.mark.parametrize(("setting", "method", "norm"), [
    ("omniglot", "plain", "batch"), ("omniglot", "multistage", "group"), ("synthetic", "plain", "batch"),
    ("synthetic", "multistage", "batch"), ("synthetic", "loss", "batch"),
])  # fmt: skip
def test_flop_count_equals_counting_a_whole_step(bench: ModuleType, setting: str, method: str, norm: str) -> None:
    """The per-row extrapolation (N / b model passes on b rows + the loss at N) counts what a real step runs."""
    torch.manual_seed(0)
    case, chunk = bench.Case(method, 12, norm), 5  # 12 rows in chunks of 5, 5 and 2
    model, images, labels, _ = bench.build(setting, "cpu", case)
    loss_fn = RecallAtKLoss(k=(1, 2, 4, 8, 16), tau_rank=0.01)
    with FlopCounterMode(display=False) as counter:
        if method == "multistage":
            multistage_backward(model, loss_fn, images, labels, chunk)
        elif method == "plain":
            loss_fn(model(images), labels).backward()
        else:
            embeddings = torch.nn.functional.normalize(torch.randn(12, bench.EMBEDDING_DIM), dim=1)
            loss_fn(embeddings.requires_grad_(), labels).backward()
    whole_step = counter.get_total_flops()
    assert whole_step > 0
    assert bench.step_flops(method, model, loss_fn, images, labels, chunk, None) == whole_step
