"""The run directory: one training run's config, metrics, checkpoints, plots and summary.

Layout::

    config.yaml          the resolved config
    metrics.csv          one row per epoch (appended and flushed as the run goes)
    steps.csv            one row per optimiser step (loss, learning rate), written with each last.pt
    checkpoints/last.pt  the latest resumable state;  checkpoints/best.pt  the best on validation
    plots/*.png          curves and retrieval examples
    summary.json         final metrics (written last, atomically: its presence means the run finished)
    .recallk-run         written when recallk creates the directory: it is recallk's to write in

A directory that already holds a run is never overwritten: a new run refuses it unless it resumes, and an
exclusive lock (``.lock``) stops two processes from using the same directory at once. A non-empty directory
without ``.recallk-run`` (files recallk did not write) is refused as well, so no file of the user is overwritten.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, TextIO

from recallk.errors import RecallkUsageError
from recallk.files import TEMPORARY_SUFFIX, OutputWriteError, atomic_write_text, read_metrics, write_json

# Files whose presence means the directory holds (part of) a run's results. A config.yaml alone does not count: it
# is all a run leaves when it fails before its first epoch ends (e.g. on an undecodable image), and the same command
# must work again once the problem is fixed.
STEPS_CSV = "steps.csv"
RUN_MARKERS = ("metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt", "summary.json")
OWNER_MARKER = ".recallk-run"  # created with the directory: everything in it is the run's to write
LOCK_FILE = ".lock"


def is_recallk_run(path: Path | str) -> bool:
    """Whether ``path`` is a directory recallk created for a run (its marker, or an earlier version's run files)."""
    path = Path(path)
    return (path / OWNER_MARKER).exists() or any((path / m).exists() for m in RUN_MARKERS)


def check_run_dir(path: Path | str, resume: bool = False) -> None:
    """Refuse ``path`` if it already holds a run (unless ``resume``), or if ``resume`` but it has no last.pt.

    Creates nothing, so callers can check a ``--run-dir`` before slow set-up (data, model) and fail at once.
    """
    path = Path(path)
    existing = [m for m in RUN_MARKERS if (path / m).exists()]
    if existing and not resume:
        raise RecallkUsageError(
            f"run directory {path} already holds a run ({', '.join(existing)}); pass --resume {path} "
            "to continue it, or choose a new --run-dir"
        )
    if path.exists() and not path.is_dir():
        raise RecallkUsageError(f"run directory {path} is a file; choose a new or empty folder with --run-dir")
    if not resume and path.is_dir() and not is_recallk_run(path):
        foreign = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RecallkUsageError(
                f"run directory {path} is not empty ({shown}) and is not a recallk run; choose a new or empty folder "
                "with --run-dir (recallk never writes into a folder of other files)"
            )
    if resume and not (path / "checkpoints" / "last.pt").is_file():
        raise RecallkUsageError(
            f"cannot resume: {path / 'checkpoints' / 'last.pt'} does not exist (not a run directory, or its run "
            "stopped before the first checkpoint); start a new run with another --run-dir"
        )


class RunDirectory:
    """Owns a run directory for the lifetime of a run (use as a context manager to release the lock)."""

    def __init__(self, path: Path | str, resume: bool = False) -> None:
        self.path = Path(path)
        check_run_dir(self.path, resume)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputWriteError(self.path, err) from err  # says why (read-only, permission, full); cli: --run-dir
        self._lock: TextIO | None = open(self.path / LOCK_FILE, "a")  # noqa: SIM115 - held until close(); "a": never wipe a running owner's pid
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RecallkUsageError(
                f"run directory {self.path} is in use by another recallk process; wait for it to finish or "
                "choose another --run-dir"
            ) from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        try:
            check_run_dir(self.path, resume)  # again under the lock: another run may have finished meanwhile
        except RecallkUsageError:
            self.close()
            raise
        if not (self.path / OWNER_MARKER).exists():
            (self.path / OWNER_MARKER).touch()  # once: a resumed run changes nothing it does not write
        self._remove_partial_writes()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _remove_partial_writes(self) -> None:
        """Delete temporary files of atomic writes cut short by a crash (safe: this process holds the lock)."""
        for folder in (self.path, self.checkpoints, self.plots):
            for partial in folder.glob(f".*{TEMPORARY_SUFFIX}"):
                partial.unlink(missing_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def write_text(self, name: str, text: str) -> Path:
        """Write ``name`` atomically (the old file stays intact if writing fails, e.g. disk full)."""
        target = self.path / name
        atomic_write_text(target, text)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return write_json(self.path / name, data)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.csv`` (header from the first row's keys; new keys extend the header)."""
        path = self.path / "metrics.csv"
        rows = read_metrics(path)
        fields = list(rows[0].keys()) if rows else []
        fields += [k for k in row if k not in fields]
        rows.append({k: row.get(k, "") for k in fields})
        lines = _csv_text(fields, rows)
        atomic_write_text(path, lines)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows past optimiser step ``after_step`` (written after the checkpoint a resumed run starts from)."""
        _truncate_csv(self.path / "metrics.csv", after_step)

    def append_steps(self, rows: list[dict[str, Any]]) -> None:
        """Append optimiser steps' rows (``step``, ``epoch`` position after it, ``loss``, ``lr``) to ``steps.csv``
        (the header first): the per-step loss curve of the plots."""
        if not rows:
            return
        path = self.path / STEPS_CSV
        new = not path.is_file() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def truncate_steps(self, after_step: int) -> None:
        """Drop ``steps.csv`` rows past optimiser step ``after_step`` (a resumed run redoes those steps)."""
        _truncate_csv(self.path / STEPS_CSV, after_step)


    def append_census(self, row: dict[str, Any]) -> None:
        """Append one step's positive-pair census to ``census.jsonl``."""
        with open(self.path / "census.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def truncate_census(self, after_step: int) -> None:
        """Drop census rows past optimiser step ``after_step`` (a resumed run redoes those steps)."""
        path = self.path / "census.jsonl"
        if path.exists():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= after_step]
            atomic_write_text(path, "".join(f"{line}\n" for line in rows))


def new_run_name(name: str) -> str:
    """``<name>-<YYYYmmdd-HHMMSS>-<6 hex digits>``: the start time, and a suffix that tells apart runs started in the
    same second (random; in a torchrun job derived from the job's rendezvous, so that every rank names the same
    folder)."""
    job = [os.environ.get(key, "") for key in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(job):
        suffix = hashlib.sha256("\0".join(job).encode()).hexdigest()[:6]
    else:
        suffix = secrets.token_hex(3)
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"


def run_dir_in_use(path: Path) -> bool:
    """True while another process holds the run directory's lock."""
    lock = Path(path) / LOCK_FILE
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _csv_text(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in fields})
    return buffer.getvalue()


def _truncate_csv(path: Path, after_step: int) -> None:
    """Keep the rows of the CSV file ``path`` whose ``step`` is at most ``after_step`` (no rows: no file)."""
    rows = [r for r in read_metrics(path) if int(r["step"]) <= after_step]
    if rows:
        atomic_write_text(path, _csv_text(list(rows[0].keys()), rows))
    elif path.exists():
        path.unlink()
