"""recallk.files: the one atomic writer keeps the old file on every failure and leaves no temporary file behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recallk.files import OutputWriteError, atomic_write, atomic_write_text, read_metrics, write_json


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_writes_the_whole_file_with_the_usual_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    atomic_write(target, lambda handle: handle.write(b"abc"))
    assert target.read_bytes() == b"abc"
    assert target.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode
    assert _leftovers(target.parent) == []


def test_an_error_in_the_writer_keeps_the_old_content_and_propagates(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def half_then_fail(handle: object) -> None:
        handle.write(b"new but incomplete")  # type: ignore[attr-defined]
        raise ValueError("checksum mismatch")

    with pytest.raises(ValueError, match="checksum mismatch"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_an_os_error_of_the_writer_is_not_mistaken_for_a_full_disk(tmp_path: Path) -> None:
    def network_down(handle: object) -> None:
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        atomic_write(tmp_path / "x", network_down)


def test_a_full_disk_is_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    """A real file-size limit (RLIMIT_FSIZE) in a child process: the write fails, the old file stays."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"previous")
    script = f"""
import resource, signal
from pathlib import Path
from recallk.files import OutputWriteError, atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    atomic_write(Path({str(target)!r}), lambda handle: handle.write(b"x" * 5000))
except OutputWriteError as err:
    print("ERROR", err)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ERROR could not write"), out.stdout + out.stderr
    assert str(target) in out.stdout and "is intact" in out.stdout
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []
    assert issubclass(OutputWriteError, ValueError)  # a usage error: the command line exits 2


def test_write_json_and_read_metrics(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", {"b": 1, "a": [1.5]})
    assert path.read_text().endswith("\n") and json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    assert list(json.loads(write_json(tmp_path / "c.json", {"z": 0, "y": 1}, sort_keys=False).read_text())) == [
        "z", "y"]
    assert read_metrics(tmp_path / "missing.csv") == []
    (tmp_path / "metrics.csv").write_text("epoch,loss\n1,0.5\n2,0.25\n")
    assert read_metrics(tmp_path / "metrics.csv") == [{"epoch": "1", "loss": "0.5"}, {"epoch": "2", "loss": "0.25"}]
