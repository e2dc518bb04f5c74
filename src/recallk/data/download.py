"""Download one file with a progress bar, a checksum check and an atomic rename into place."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from recallk.files import atomic_write

_CHUNK = 1 << 16


class DownloadError(OSError):
    """The file could not be fetched (no network, refused connection, HTTP error)."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"md5:<hex>"`` / ``"sha256:<hex>"`` into ``(algorithm, lowercase hex digest)``."""
    algorithm, sep, digest = checksum.partition(":")
    if not sep or algorithm not in hashlib.algorithms_guaranteed or not digest:
        raise ValueError(f"checksum {checksum!r} must look like 'md5:<hex>' or 'sha256:<hex>'")
    return algorithm, digest.lower()


def download_file(
    url: str,
    dest: str | Path,
    checksum: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``.

    The bytes go to a temporary file beside ``dest`` and are hashed on the way; only when ``checksum`` (``"md5:..."``
    or ``"sha256:..."``, or ``None`` to skip) matches is the file renamed onto ``dest``
    (:func:`recallk.files.atomic_write`), so ``dest`` is never left half-written. Raises :class:`DownloadError` when
    the server cannot be reached and ``ValueError`` on a checksum mismatch (nothing is saved in either case).
    """
    dest = Path(dest)
    expected = parse_checksum(checksum) if checksum else None
    hasher = hashlib.new(expected[0]) if expected else None

    def fetch(out: Any) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            if getattr(out, "error", None) is not None:
                raise  # the disk, not the network: atomic_write reports it
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"could not download {url}: {reason}") from exc
        if expected is not None and hasher is not None and hasher.hexdigest() != expected[1]:
            raise ValueError(
                f"checksum mismatch for {url}: expected {expected[0]} {expected[1]}, got {hasher.hexdigest()}; "
                f"nothing was saved to {dest}"
            )

    atomic_write(dest, fetch)
    return dest
