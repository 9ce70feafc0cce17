"""An append-only journal of JSON lines that are fsync'd before `append` returns.

The memory writes every record here first: once `append` returns, the record survives the
process being killed. Each open `Journal` owns one file in a folder and holds an exclusive lock on
it for its lifetime, so files whose lock is free belong to processes that are gone: `orphans`
finds them and `replay` reads them back. Threads appending at once share fsyncs (group commit).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)
SUFFIX = ".jsonl"


class Journal:
    """One process's journal file in `folder`, created on the first append.

    Args:
        folder: Where journal files live; created if missing.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        self._lock = FileLock(_lock_path(self.path), thread_local=False)
        self._cond = threading.Condition()
        self._buffer: list[bytes] = []
        self._queued = 0  # lines handed to `append`
        self._durable = 0  # lines settled: written and fsync'd, or failed
        self._written = 0  # lines written and fsync'd
        self._flushing = False
        self._failures: list[tuple[int, int, BaseException]] = []  # (first, last) line numbers that failed
        self._file: Any = None

    @property
    def written(self) -> int:
        """How many lines this journal has written and synced since it opened."""
        with self._cond:
            return self._written

    def append(self, line: str) -> None:
        """Append one line (no newline inside) and return once it is on disk.

        Raises:
            OSError: If the file cannot be written or synced.
        """
        if "\n" in line:
            raise ValueError("a journal line must not contain a newline")
        with self._cond:
            self._buffer.append(line.encode() + b"\n")
            self._queued += 1
            mine = self._queued
            while self._durable < mine:
                if self._flushing:
                    self._cond.wait()
                    continue
                batch, self._buffer, first, last = self._buffer, [], self._durable + 1, self._queued
                self._flushing = True
                self._cond.release()
                written = False
                try:
                    self._write(b"".join(batch))
                    written = True
                finally:  # the leader's own error propagates; followers read it from _failures
                    self._cond.acquire()
                    if written:
                        self._written += len(batch)
                    else:
                        self._failures.append((first, last, sys.exc_info()[1] or OSError("write failed")))
                    self._flushing = False
                    self._durable = last  # settled: written, or failed and recorded
                    self._cond.notify_all()
            for first, last, error in self._failures:
                if first <= mine <= last:
                    raise error

    def _write(self, data: bytes) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the journal's lifetime
        if self._failures:
            data = b"\n" + data  # end any line a failed write left torn
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def truncate_if(self, written: int) -> bool:
        """Empty the file if exactly `written` lines were made durable and none is in flight.

        The caller passes how many lines it knows to be safely elsewhere (in the store); a line
        appended meanwhile keeps the file as it is.
        """
        with self._cond:
            if self._file is None or self._flushing or self._buffer or self._written != written:
                return False
            self._file.truncate(0)
            return True

    def close(self) -> None:
        """Close the file; remove it if it is empty, otherwise leave it for `replay`."""
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._file is None:
                return
            empty = os.fstat(self._file.fileno()).st_size == 0  # tell() keeps its place after truncate
            self._file.close()
            self._file = None
            if empty:
                self.path.unlink(missing_ok=True)
            self._lock.release()
            if empty:
                with suppress(OSError):
                    Path(self._lock.lock_file).unlink()

    def orphans(self) -> list[Path]:
        """Journal files in this folder other than ours whose owner is gone (their lock is free)."""
        if not self.folder.is_dir():
            return []
        return [path for path in sorted(self.folder.glob(f"*{SUFFIX}")) if path != self.path and _free(path)]


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects in a journal file; a torn or corrupt line is skipped with a warning.

    A torn line can only be the one being written when its process died, before `append`
    returned, so no acknowledged record is skipped.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except ValueError:
                logger.warning("skipping unreadable line %d of journal %s (torn write)", number, path)


def replay(path: Path, apply: Any) -> int:
    """Claim an orphaned journal file, pass its records to `apply`, then delete the file.

    Args:
        path: A file from `Journal.orphans`.
        apply: Called once with the list of records; must store them idempotently and raise on
            failure (the file is then kept for a later try).

    Returns:
        How many records were applied; 0 if another process claimed the file first.
    """
    lock = FileLock(_lock_path(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return 0
    try:
        if not path.exists():
            return 0
        records = list(read_lines(path))
        if records:
            apply(records)
        path.unlink()
        with suppress(OSError):
            Path(lock.lock_file).unlink()
        return len(records)
    finally:
        lock.release()


def _lock_path(path: Path) -> str:
    return str(path) + ".lock"


def _free(path: Path) -> bool:
    lock = FileLock(_lock_path(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


__all__ = ["Journal", "read_lines", "replay"]
