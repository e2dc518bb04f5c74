"""Run ``recallk`` commands as real child processes with faults injected (used by tests/test_reliability.py).

A fresh interpreter spends about ten seconds importing torch, timm and recallk on a busy machine, so a *launcher*
process imports them once and forks one child per command. Every child is a separate process, in a session of
its own (a Ctrl-C can be sent to its whole process group, DataLoader workers included, as a terminal does), with
its own stdout and stderr files and exit status; it runs the real entry point ``recallk/__main__.py`` through
:mod:`runpy` with ``sys.argv`` set, exactly as ``python -m recallk ARGS`` does after its imports.

Faults are injected by patching inside the child only; product code has no hooks for them:

- ``kill_on_save: [NAME, N, SNAPSHOT]``: on the Nth checkpoint write to a file called NAME, copy the current NAME
  (the last good checkpoint) to SNAPSHOT, write half of the new checkpoint's bytes into the temporary file, fsync,
  and SIGKILL the process;
- ``nan_at_step: N``: the loss of optimiser step N (1-based) becomes NaN;
- ``pause_at_step: [N, DIR]``: before step N, create ``DIR/paused`` and wait (up to two minutes) until ``DIR/go``
  exists; signals that arrive meanwhile are handled as usual;
- ``file_size_limit: BYTES``: ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so writing past BYTES into any file fails
  with ``EFBIG``, as on a full disk.

The launcher (``python tests/reliability_helpers.py``) reads one JSON request per line on stdin and answers one
JSON line on stdout: ``{"start": {"argv": [...], "cwd": ..., "stdout": PATH, "stderr": PATH, "faults": {...}}}``
answers ``{"pid": PID}``; ``{"wait": PID, "timeout": SECONDS}`` answers ``{"status": CODE}``, CODE being the exit
status, minus the signal number when a signal killed the child, or null after the timeout (the child's session
is then killed).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAUSE_LIMIT_SECONDS = 120.0


# ---------------------------------------------------------------------------------------------------------------------
# Client side (the test process)


@dataclass
class Finished:
    """Outcome of one child: exit status (negative: killed by that signal; None: timed out), stdout, stderr."""

    returncode: int | None
    stdout: str
    stderr: str


class Child:
    """A running ``recallk`` command; its pid is also its process group (and session) id."""

    def __init__(self, launcher: Launcher, pid: int, stdout: Path, stderr: Path) -> None:
        self.launcher, self.pid, self._stdout, self._stderr = launcher, pid, stdout, stderr

    def ctrl_c(self) -> None:
        """Send SIGINT to the child's process group, as pressing Ctrl-C in its terminal does."""
        os.killpg(self.pid, signal.SIGINT)

    def terminate(self) -> None:
        """Send SIGTERM to the child's process group, as Slurm, ``timeout`` or ``kill -TERM -PGID`` do."""
        os.killpg(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the child's process group, as the out-of-memory killer or a lost machine do."""
        os.killpg(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 180.0) -> Finished:
        status = self.launcher._ask({"wait": self.pid, "timeout": timeout})["status"]
        return Finished(status, self._stdout.read_text(errors="replace"), self._stderr.read_text(errors="replace"))


class Launcher:
    """Starts the launcher process; :meth:`start` and :meth:`run` run ``recallk ARGS`` in forked children."""

    def __init__(self, workdir: Path, cwd: Path) -> None:
        self.workdir, self.cwd, self._count = workdir, cwd, 0
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=cwd,
        )
        ready = self._process.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"the fault-injection launcher did not start (said {ready!r})")

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError("the fault-injection launcher exited")
        return json.loads(answer)

    def start(self, *args: object, faults: dict[str, Any] | None = None, cwd: Path | None = None) -> Child:
        """Start ``recallk ARGS`` with ``faults`` (see the module docstring) in ``cwd`` (default: the launcher's) and
        return at once."""
        self._count += 1
        stdout, stderr = self.workdir / f"child{self._count}.out", self.workdir / f"child{self._count}.err"
        request = {
            "argv": [str(a) for a in args], "cwd": str(cwd or self.cwd), "stdout": str(stdout),
            "stderr": str(stderr), "faults": faults or {},
        }
        return Child(self, self._ask({"start": request})["pid"], stdout, stderr)

    def run(
        self, *args: object, faults: dict[str, Any] | None = None, cwd: Path | None = None, timeout: float = 180.0
    ) -> Finished:
        """Run ``recallk ARGS`` with ``faults`` in ``cwd`` to the end."""
        return self.start(*args, faults=faults, cwd=cwd).wait(timeout)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher side


def _serve() -> None:
    import runpy

    import torch  # noqa: F401 - imported once here, shared by every forked child

    import recallk.cli  # noqa: F401
    import recallk.training.evaluate_run  # noqa: F401
    import recallk.training.trainer  # noqa: F401

    protocol = sys.stdout
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    running: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["start"], runpy)
            running.add(pid)
            answer: dict[str, Any] = {"pid": pid}
        else:
            answer = {"status": _wait(request["wait"], request["timeout"])}
            running.discard(request["wait"])
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()
    for pid in running:  # the tests are over: leave no child behind (e.g. one still paused after a failure)
        _wait(pid, timeout=0)


def _wait(pid: int, timeout: float) -> int | None:
    """Exit status of child ``pid``; after ``timeout`` seconds its session is killed and None is returned."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    return None


def _child(request: dict[str, Any], runpy: Any) -> None:
    """Become ``python -m recallk ARGS`` (never returns)."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's whole life
        os.chdir(request["cwd"])
        _inject(request["faults"])
        sys.argv = ["recallk", *request["argv"]]
        try:
            runpy.run_module("recallk", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_request:
            code = _exit_code(exit_request.code)
    except BaseException:  # noqa: BLE001 - report like an interpreter would, then leave
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _inject(faults: dict[str, Any]) -> None:
    if "file_size_limit" in faults:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(faults["file_size_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if "kill_on_save" in faults:
        _kill_on_save(*faults["kill_on_save"])
    if "nan_at_step" in faults:
        _nan_at_step(int(faults["nan_at_step"]))
    if "pause_at_step" in faults:
        _pause_at_step(int(faults["pause_at_step"][0]), Path(faults["pause_at_step"][1]))


def _kill_on_save(name: str, count: int, snapshot: str) -> None:
    import torch

    from recallk.training import trainer

    real_save_checkpoint, real_torch_save = trainer.save_checkpoint, torch.save
    armed: list[Path] = []
    seen = 0

    def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
        nonlocal seen
        if Path(path).name == name:
            seen += 1
            if seen == count:
                armed.append(Path(path))
        real_save_checkpoint(path, state)

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not armed:
            real_torch_save(obj, f, *args, **kwargs)
            return
        shutil.copyfile(armed[0], snapshot)
        buffer = io.BytesIO()
        real_torch_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    trainer.save_checkpoint = save_checkpoint
    torch.save = torch_save


def _nan_at_step(step: int) -> None:
    from recallk.training.trainer import Trainer

    real = Trainer._guarded_loss

    def guarded_loss(self: Trainer, embeddings: Any, labels: Any, **kwargs: Any) -> Any:
        loss = real(self, embeddings, labels, **kwargs)
        return loss * float("nan") if self.step + 1 == step else loss

    Trainer._guarded_loss = guarded_loss


def _pause_at_step(step: int, folder: Path) -> None:
    from recallk.training.trainer import Trainer

    real = Trainer._train_step

    def train_step(self: Trainer, images: Any, labels: Any) -> float:
        if self.step + 1 == step:
            (folder / "paused").touch()
            deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
            while not (folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return real(self, images, labels)

    Trainer._train_step = train_step


if __name__ == "__main__":
    _serve()
