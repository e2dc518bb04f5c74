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
from pathlib import Path
from typing import TextIO

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
    """Copies recallk's log records (INFO and above) into ``<run_dir>/train.log`` until :meth:`close`.

    The file is appended to, never overwritten: a resumed run continues the log of the run it resumes. The
    ``recallk`` logger is lowered to INFO while the copy is open when it is set higher, so the file holds the
    progress lines even in a program that never configured logging (its console then still shows warnings only).

    ``held``: keep the records in memory until :meth:`commit` (a resume that fails before it writes nothing).
    """

    def __init__(self, run_dir: Path, held: bool = False) -> None:
        self.path = Path(run_dir) / RUN_LOG
        self.file = logging.FileHandler(self.path, mode="a", encoding="utf-8", delay=True)
        self.file.setLevel(logging.INFO)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.held: _Held | None = _Held() if held else None
        self.handler: logging.Handler = self.held or self.file
        self.logger = logging.getLogger("recallk")
        self.level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def position(self) -> int:
        """The length of ``train.log`` in bytes (every record is flushed as it is written)."""
        return self.path.stat().st_size if self.path.exists() else 0

    def commit(self, keep_bytes: int | None = None) -> None:
        """Cut ``train.log`` to its first ``keep_bytes`` bytes (the length a checkpoint recorded: what a killed run
        logged after it is redone), then write the held records and go on writing to the file."""
        if keep_bytes is not None and self.position() > keep_bytes:
            os.truncate(self.path, keep_bytes)
        if self.held is not None:
            self.logger.removeHandler(self.held)
            self.logger.addHandler(self.file)
            self.handler = self.file
            for record in self.held.records:
                self.file.handle(record)
            self.held = None

    def close(self) -> None:
        """Stop copying; records still held (a resume that failed) are dropped."""
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        self.file.close()


class _Held(logging.Handler):
    """Keeps INFO and higher records in memory."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
