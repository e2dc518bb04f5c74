"""The command line, run as a real subprocess (`python -m recallk ...`)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recallk.config import config_from_dict, load_config, save_config
from recallk.evaluation.metrics import format_metrics_table

from data_fixtures import make_omniglot_folder

REPO = Path(__file__).resolve().parents[1]


def recallk(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recallk", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2 and exactly one `recallk: error:` line on stderr, without a traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("recallk: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_help_lists_commands_and_examples():
    result = recallk("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "embed", "demo"):
        assert command in result.stdout
    assert "examples:" in result.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "embed", "demo"])
def test_subcommand_help_shows_examples(command):
    result = recallk(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout and f"recallk {command}" in result.stdout


def test_no_command_prints_help_and_fails():
    result = recallk()
    assert result.returncode == 2 and "COMMAND" in result.stdout


def test_malformed_yaml(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("data:\n  batch_size: [4000\n", encoding="utf-8")
    assert_one_line_error(recallk("train", config), str(config), "malformed YAML", "line 3")


def test_unknown_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("optim:\n  lr: 1e-4\n  wieght_decay: 0.1\n", encoding="utf-8")
    assert_one_line_error(recallk("train", config), "'optim.wieght_decay'", "did you mean 'optim.weight_decay'")


def test_wrong_type(tmp_path):
    config = tmp_path / "types.yaml"
    config.write_text("data:\n  batch_size: four thousand\n", encoding="utf-8")
    assert_one_line_error(recallk("train", config), "'data.batch_size'", "expected an integer", "'four thousand'")


def test_bad_override_and_cross_field_error():
    config = REPO / "configs" / "omniglot.yaml"
    assert_one_line_error(recallk("train", config, "train.amp=fp8"), "'train.amp'", "'bf16'")
    assert_one_line_error(recallk("train", config, "data.batch_size=510"), "data.samples_per_class=4", "508 or 512")


def test_missing_config_file(tmp_path):
    assert_one_line_error(recallk("train", tmp_path / "nope.yaml"), "does not exist")


def test_argparse_errors_are_one_line():
    assert_one_line_error(recallk("train"), "CONFIG", "recallk train --help")
    assert_one_line_error(recallk("frobnicate"), "invalid choice")
    assert_one_line_error(recallk("train", "configs/omniglot.yaml", "--bogus"), "--bogus")


def test_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("optim:\n  lrr: 1\n", encoding="utf-8")
    result = recallk("--debug", "train", config)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("recallk: error:")


def test_dry_run_prints_the_resolved_config(tmp_path):
    make_omniglot_folder(tmp_path / "omniglot", alphabets={"Alpha": 10}, drawings=4)  # the dry run reads its labels
    result = recallk(
        "train", "configs/omniglot.yaml", "optim.lr=1e-5", "--device", "cpu", "--data-dir", tmp_path,
        "data.val_classes=2", "data.batch_size=16", "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    cfg = config_from_dict(yaml.safe_load(result.stdout))
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.data.batch_size == 16  # an override after the options still counts
    assert (cfg.train.device, cfg.data.data_dir) == ("cpu", str(tmp_path))
    assert cfg.model == load_config(REPO / "configs" / "omniglot.yaml").model


def test_resume_reads_the_run_config(tmp_path):
    run_dir = tmp_path / "run"
    save_config(load_config(REPO / "configs" / "omniglot.yaml"), run_dir / "config.yaml")
    result = recallk("train", "--resume", run_dir, "train.epochs=20", "--dry-run")
    assert result.returncode == 0, result.stderr
    cfg = config_from_dict(yaml.safe_load(result.stdout))
    assert (cfg.train.epochs, cfg.output.run_dir, cfg.name) == (20, str(run_dir), "omniglot")
    assert_one_line_error(recallk("train", "--resume", tmp_path / "missing"), "not a run directory")
    assert_one_line_error(
        recallk("train", "--resume", run_dir, "--run-dir", tmp_path / "other"), "different directories"
    )


def test_evaluate_missing_run():
    assert_one_line_error(recallk("evaluate", "runs/does-not-exist"), "does not exist")


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """SIGINT while the config is being read (from a FIFO that never gets data)."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    process = subprocess.Popen(
        [sys.executable, "-m", "recallk", "train", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None:  # opening the FIFO for writing succeeds once recallk has it open for reading
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                assert err.errno == errno.ENXIO and process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(0.2)  # let the reader enter read(); a signal during open() is handled the same way
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert stderr.strip() == "recallk: interrupted"


def test_format_metrics_table():
    table = format_metrics_table({"test": {"recall@1": 0.85612, "num_queries": 10}, "val": {"recall@1": 0.5}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "test", "val"]
    assert lines[1].split() == ["recall@1", "0.8561", "0.5000"]
    assert lines[2].split() == ["num_queries", "10", "-"]


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    """`recallk recipes | head -1`: stdout's reader is gone before recallk writes; it stops quietly (exit 141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to write_end now fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "recallk", "recipes"], stdout=write_end, stderr=subprocess.PIPE, text=True,
            cwd=REPO, timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
