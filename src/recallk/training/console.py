"""What a run prints: progress bars on a terminal only, plain log lines elsewhere, and a copy in ``train.log``.

Progress bars redraw their line with carriage returns, which a log file keeps as one endless line; so bars are
drawn only where someone watches them. :func:`show_progress` decides it once (``recallk ... --progress`` /
``--quiet`` force it either way); the periodic ``INFO`` lines of the trainer (every ``train.log_every`` steps and
per epoch) carry the same information in any output. :class:`RunLog` copies those lines into the run folder.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from recallk.errors import TrainingInterrupted

RUN_LOG = "train.log"


def show_progress(progress: bool | None = None, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: ``progress`` when given; else (``None``, automatic) only when ``stream``
    (default ``sys.stderr``, where tqdm draws) is a terminal or a Jupyter kernel, and ``TQDM_DISABLE`` is not set."""
    if progress is not None:
        return progress
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    return terminal or "ipykernel" in sys.modules


class RunLog:
    """Copies every line a run shows on the console into ``<run_dir>/train.log``, from its start until :meth:`close`:
    log records of INFO and above (recallk's, and those of other libraries that reach the root logger, such as
    timm's weight loading), Python warnings (shown as usual too), and the lines :meth:`note` adds (the final test
    table, the line that ends an interrupted run).

    Records are held in memory until :meth:`open` names the run folder (checking the config, building the model and
    data come before it exists), or, for a resume, until :meth:`commit` (a resume that fails before it writes
    nothing); :meth:`close` before that drops them. The file is appended to, never overwritten: a resumed run
    continues the log of the run it resumes. The ``recallk`` logger is lowered to INFO while the copy is open when it
    is set higher, so the file holds the progress lines even in a program that never configured logging (its
    console then still shows warnings only).
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.file: logging.FileHandler | None = None
        self.held: _Held | None = _Held()
        self.handler: logging.Handler = self.held
        self.logger = logging.getLogger("recallk")
        self.level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.handler)
        self.previous_showwarning = warnings.showwarning
        warnings.showwarning = self._showwarning

    def open(self, run_dir: Path, held: bool = False) -> None:
        """Write to ``run_dir/train.log``: the held records and every later one at once, or with ``held`` (a resume)
        from :meth:`commit` on."""
        self.path = Path(run_dir) / RUN_LOG
        self.file = logging.FileHandler(self.path, mode="a", encoding="utf-8", delay=True)
        self.file.setLevel(logging.INFO)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        if not held:
            self.commit()

    def note(self, text: str, level: int = logging.INFO) -> None:
        """Add ``text`` to the file only (what the command line prints itself, e.g. the final metrics table)."""
        self.handler.handle(logging.LogRecord("recallk", level, __file__, 0, text, None, None))

    def _showwarning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        self.note(text, logging.WARNING)
        self.previous_showwarning(message, category, filename, lineno, file, line)

    def position(self) -> int:
        """The length of ``train.log`` in bytes (every record is flushed as it is written; 0 before :meth:`open`)."""
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0

    def commit(self, keep_bytes: int | None = None) -> None:
        """Cut ``train.log`` to its first ``keep_bytes`` bytes (the length a checkpoint recorded: what a killed run
        logged after it is redone), then write the held records and go on writing to the file."""
        if self.path is None or self.file is None:
            raise RuntimeError("RunLog.commit() before open(): no train.log to write")
        if keep_bytes is not None and self.position() > keep_bytes:
            os.truncate(self.path, keep_bytes)
        if self.held is not None:
            root = logging.getLogger()
            root.removeHandler(self.held)
            root.addHandler(self.file)
            self.handler = self.file
            for record in self.held.records:
                self.file.handle(record)
            self.held = None

    def close(self) -> None:
        """Stop copying; records still held (the run folder never opened, a resume that failed) are dropped."""
        if warnings.showwarning == self._showwarning:
            warnings.showwarning = self.previous_showwarning
        logging.getLogger().removeHandler(self.handler)
        self.logger.setLevel(self.level)
        if self.file is not None:
            self.file.close()


class _Held(logging.Handler):
    """Keeps INFO and higher records in memory."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def final_report(summary: Mapping[str, Any]) -> str:
    """What ``recallk train`` prints when a run ends (and ``train.log`` keeps): the test metrics table, the landmark
    benchmarks' table when there are any, and where the run's files are."""
    from recallk.evaluation.metrics import format_metrics_table
    from recallk.evaluation.revisited import format_revisited_table

    tables = [format_metrics_table(summary["splits"])]
    if "benchmarks" in summary:
        tables.append(format_revisited_table(summary["benchmarks"]))
    return "\n".join([*tables, f"run directory: {summary['run_dir']} (metrics.csv, checkpoints/, summary.json)"])


def ending_line(err: BaseException) -> tuple[int, str]:
    """The level and line ``train.log`` ends with when a run stops on ``err`` (the command line prints its own)."""
    if isinstance(err, TrainingInterrupted):
        return logging.WARNING, str(err)  # "interrupted at step N; resume with: ..."
    if isinstance(err, KeyboardInterrupt):
        return logging.WARNING, "interrupted"
    return logging.ERROR, f"stopped: {type(err).__name__}: {' '.join(str(err).split())}"
